//! `--web.config.file`: TLS and basic authentication for the daemon's own HTTP
//! server, in the Prometheus exporter-toolkit format, so operators reuse the
//! file they already wrote for node_exporter or blackbox_exporter.
//!
//! The file is read at start and again on every reload (SIGHUP or
//! `/-/reload`), so certificates and users rotate without a restart; a broken
//! file is refused with positioned errors and the previous one stays in force.
//! Switching TLS on or off takes a restart. Only HTTP/1.1 is served, so
//! `http2` is accepted and ignored; `rate_limit` is refused.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderName, HeaderValue};
use base64::Engine;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, NamedGroup, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use sha2::{Digest, Sha256};

use crate::config::{ConfigErrors, Loader, warn_if_readable_by_others};

/// The web config in force. The default (no file) serves plain HTTP to anyone.
#[derive(Default)]
pub struct WebConfig {
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    /// TLS for the server; plain HTTP when `None`.
    pub tls: Option<Arc<ServerConfig>>,
    /// Users and their bcrypt hashes; no authentication when empty.
    users: BTreeMap<String, String>,
    /// Paths served without authentication (`auth_excluded_paths`).
    pub auth_excluded_paths: Vec<String>,
    /// Headers added to every response (`http_server_config.headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl WebConfig {
    /// Whether requests must carry basic-auth credentials.
    pub fn requires_auth(&self, path: &str) -> bool {
        !self.users.is_empty() && !self.auth_excluded_paths.iter().any(|p| p == path)
    }
}

/// `tls_server_config`, as exporter-toolkit spells it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSpec {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    #[serde(default)]
    cipher_suites: Vec<String>,
    prefer_server_cipher_suites: Option<bool>,
    #[serde(default)]
    curve_preferences: Vec<String>,
}

/// `http_server_config`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HttpSpec {
    /// Accepted for compatibility; only HTTP/1.1 is served.
    #[allow(dead_code)]
    http2: Option<bool>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Headers exporter-toolkit lets a web config set, with their allowed values
/// (any value when empty).
const EXTRA_HEADERS: &[(&str, &[&str])] = &[
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
    ("Content-Security-Policy", &[]),
];

const SECTIONS: &str = "`tls_server_config`, `http_server_config`, `basic_auth_users`, `auth_excluded_paths`";

/// Reads and validates a web config file, reporting every problem at once as
/// `file:line:col: field: message`. Secret values (keys, hashes) are never
/// quoted in messages.
pub fn load(path: &Path) -> Result<WebConfig, ConfigErrors> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigErrors::whole(path, 0, 0, format!("cannot read: {e}")))?;
    parse(path, &text)
}

/// Validates web-config text; `path` names the file in messages and anchors
/// relative paths (also the fuzz harness's entry, fuzz/).
pub fn parse(path: &Path, text: &str) -> Result<WebConfig, ConfigErrors> {
    let root: Value = serde_yaml::from_str(text).map_err(|e| ConfigErrors::yaml(path, &e))?;
    let mut l = Loader::new(path, text);
    let mut root = match root {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => {
            return Err(ConfigErrors::whole(
                path,
                0,
                0,
                format!("expected a mapping with {SECTIONS}"),
            ));
        }
    };
    for key in root.keys() {
        match key.as_str() {
            Some("tls_server_config" | "http_server_config" | "basic_auth_users" | "auth_excluded_paths") => {}
            Some("rate_limit") => l.error("rate_limit", "not supported by cutover-monitor; remove it"),
            other => l.error(
                other.unwrap_or("?"),
                format!("unknown section `{}`, expected one of {SECTIONS}", other.unwrap_or("?")),
            ),
        }
    }
    let tls = match root.remove("tls_server_config") {
        None | Some(Value::Null) => None,
        Some(v) => l
            .parse::<TlsSpec>(v, "tls_server_config")
            .and_then(|spec| build_tls(&mut l, spec)),
    };
    let http: HttpSpec = match root.remove("http_server_config") {
        None | Some(Value::Null) => HttpSpec::default(),
        Some(v) => l.parse(v, "http_server_config").unwrap_or_default(),
    };
    let headers = headers(&mut l, &http.headers);
    let users: BTreeMap<String, String> = match root.remove("basic_auth_users") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => l.parse(v, "basic_auth_users").unwrap_or_default(),
    };
    for (user, hash) in &users {
        if bcrypt::HashParts::from_str(hash).is_err() {
            l.error(
                format!("basic_auth_users.{user}"),
                format!(
                    "user `{user}`: not a bcrypt hash (like `$2y$10$...`; make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                ),
            );
        }
    }
    let auth_excluded_paths: Vec<String> = match root.remove("auth_excluded_paths") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => l.parse(v, "auth_excluded_paths").unwrap_or_default(),
    };
    for (i, p) in auth_excluded_paths.iter().enumerate() {
        if !p.starts_with('/') {
            l.error(
                format!("auth_excluded_paths[{i}]"),
                format!("`{p}` is not a path (starts with `/`)"),
            );
        }
    }
    l.finish()?;
    if tls.is_none() && !users.is_empty() {
        tracing::warn!(
            file = %path.display(),
            "basic_auth_users without tls_server_config: passwords cross the network in clear text"
        );
    }
    Ok(WebConfig {
        path: Some(path.to_owned()),
        tls,
        users,
        auth_excluded_paths,
        headers,
    })
}

fn headers(l: &mut Loader, spec: &BTreeMap<String, String>) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    for (name, value) in spec {
        let at = format!("http_server_config.headers.{name}");
        let Some((_, allowed)) = EXTRA_HEADERS.iter().find(|(n, _)| n == name) else {
            let names: Vec<&str> = EXTRA_HEADERS.iter().map(|(n, _)| *n).collect();
            l.error(
                at,
                format!("header `{name}` cannot be configured; allowed: {}", names.join(", ")),
            );
            continue;
        };
        if value.is_empty() {
            continue;
        }
        if !allowed.is_empty() && !allowed.contains(&value.as_str()) {
            l.error(at, format!("expected one of {allowed:?}, got {value:?}"));
            continue;
        }
        match (HeaderName::from_str(name), HeaderValue::from_str(value)) {
            (Ok(n), Ok(v)) => out.push((n, v)),
            _ => l.error(at, "not a valid HTTP header value"),
        }
    }
    out
}

const TLS: &str = "tls_server_config";

/// PEM bytes given inline (`inline_field`) or in a file (`file_field`).
fn pem_source(
    l: &mut Loader,
    inline_field: &str,
    inline: Option<String>,
    file_field: &str,
    file: Option<PathBuf>,
) -> Option<(String, Vec<u8>)> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            l.error(
                format!("{TLS}.{file_field}"),
                format!("set `{inline_field}` or `{file_field}`, not both"),
            );
            None
        }
        (Some(text), None) => Some((format!("{TLS}.{inline_field}"), text.into_bytes())),
        (None, Some(file)) => {
            let file = l.relative(&file);
            let field = format!("{TLS}.{file_field}");
            match crate::config::read_small_file(&file, 1024 * 1024) {
                Ok(bytes) => Some((field, bytes)),
                Err(e) => {
                    l.error(field, format!("cannot read {}: {e}", file.display()));
                    None
                }
            }
        }
        (None, None) => None,
    }
}

fn certificates(l: &mut Loader, (field, pem): (String, Vec<u8>)) -> Option<Vec<CertificateDer<'static>>> {
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            l.error(field, "no PEM certificate found");
            None
        }
        Err(e) => {
            l.error(field, format!("invalid PEM: {e}"));
            None
        }
    }
}

fn version(l: &mut Loader, field: &str, value: Option<&str>, default: u8) -> u8 {
    match value {
        None => default,
        Some("TLS12") => 12,
        Some("TLS13") => 13,
        Some(v @ ("TLS10" | "TLS11")) => {
            l.error(
                format!("{TLS}.{field}"),
                format!("{v} is not supported (rustls speaks TLS12 and TLS13)"),
            );
            default
        }
        Some(v) => {
            l.error(
                format!("{TLS}.{field}"),
                format!("unknown TLS version `{v}`, expected TLS12 or TLS13"),
            );
            default
        }
    }
}

/// Go's name of a suite (`TLS_AES_128_GCM_SHA256` where rustls says `TLS13_...`).
fn go_name(suite: &rustls::SupportedCipherSuite) -> String {
    let name = format!("{:?}", suite.suite());
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name,
    }
}

/// The ring provider narrowed to `cipher_suites` (TLS 1.2 only, as in Go) and
/// `curve_preferences`, in the given order.
fn provider(l: &mut Loader, spec: &TlsSpec) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    let all = rustls::crypto::ring::ALL_CIPHER_SUITES;
    if !spec.cipher_suites.is_empty() {
        let mut suites: Vec<_> = all.iter().filter(|s| s.tls13().is_some()).copied().collect();
        for (i, name) in spec.cipher_suites.iter().enumerate() {
            match all.iter().find(|s| go_name(s) == *name) {
                Some(s) if s.tls13().is_none() => suites.push(*s),
                Some(_) => {} // TLS 1.3 suites are not configurable, as in Go.
                None => {
                    let offered: Vec<String> = all.iter().map(go_name).collect();
                    l.error(
                        format!("{TLS}.cipher_suites[{i}]"),
                        format!(
                            "cipher suite `{name}` is unknown or not offered by rustls; choose from {}",
                            offered.join(", ")
                        ),
                    );
                }
            }
        }
        provider.cipher_suites = suites;
    }
    if !spec.curve_preferences.is_empty() {
        let mut groups = Vec::new();
        for (i, name) in spec.curve_preferences.iter().enumerate() {
            let wanted = match name.as_str() {
                "X25519" => Some(NamedGroup::X25519),
                "CurveP256" => Some(NamedGroup::secp256r1),
                "CurveP384" => Some(NamedGroup::secp384r1),
                _ => None,
            };
            match rustls::crypto::ring::ALL_KX_GROUPS
                .iter()
                .find(|g| Some(g.name()) == wanted)
            {
                Some(g) => groups.push(*g),
                None => l.error(
                    format!("{TLS}.curve_preferences[{i}]"),
                    format!(
                        "curve `{name}` is unknown or not offered by rustls; choose from X25519, CurveP256, CurveP384"
                    ),
                ),
            }
        }
        provider.kx_groups = groups;
    }
    provider
}

/// Builds the server's TLS config; `None` when TLS is not configured or on
/// errors (recorded on `l`).
fn build_tls(l: &mut Loader, spec: TlsSpec) -> Option<Arc<ServerConfig>> {
    let enabled = spec.cert.is_some()
        || spec.key.is_some()
        || spec.cert_file.is_some()
        || spec.key_file.is_some()
        || spec.client_ca.is_some()
        || spec.client_ca_file.is_some()
        || spec.client_auth_type.is_some();
    if !enabled {
        return None;
    }
    let min = version(l, "min_version", spec.min_version.as_deref(), 12);
    let max = version(l, "max_version", spec.max_version.as_deref(), 13);
    if min > max {
        l.error(format!("{TLS}.min_version"), "min_version is above max_version");
    }
    let provider = Arc::new(provider(l, &spec));
    if let Some(file) = &spec.key_file {
        warn_if_readable_by_others(&l.relative(file), "tls_server_config.key_file");
    }
    let cert_given = spec.cert.is_some() || spec.cert_file.is_some();
    let key_given = spec.key.is_some() || spec.key_file.is_some();
    let cert_src = pem_source(l, "cert", spec.cert, "cert_file", spec.cert_file);
    let key_src = pem_source(l, "key", spec.key, "key_file", spec.key_file);
    let ca_src = pem_source(l, "client_ca", spec.client_ca, "client_ca_file", spec.client_ca_file);
    let has_ca = ca_src.is_some();
    let certs = cert_src.and_then(|src| certificates(l, src));
    if !cert_given {
        l.error(TLS, "missing one of `cert` or `cert_file`");
    }
    let key_field = key_src.as_ref().map(|(f, _)| f.clone());
    // Parse errors are summed up, never quoted: they could carry key bytes.
    let key = key_src.and_then(|(field, pem)| {
        PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| match e {
                rustls::pki_types::pem::Error::NoItemsFound => l.error(field, "no PEM private key found"),
                _ => l.error(field, "the PEM private key is malformed"),
            })
            .ok()
    });
    if !key_given {
        l.error(TLS, "missing one of `key` or `key_file`");
    }
    let client_cas = ca_src.and_then(|src| certificates(l, src));
    let auth = spec.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let auth_field = format!("{TLS}.client_auth_type");
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match auth {
        "NoClientCert" => {
            if has_ca {
                l.error(
                    &auth_field,
                    "a client CA is set without a client auth policy: set `client_auth_type: RequireAndVerifyClientCert`",
                );
            }
            None
        }
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            if !has_ca {
                l.error(&auth_field, format!("{auth} needs `client_ca_file` (or `client_ca`)"));
            }
            client_cas.and_then(|cas| {
                let mut roots = RootCertStore::empty();
                for ca in cas {
                    if let Err(e) = roots.add(ca) {
                        l.error(format!("{TLS}.client_ca_file"), format!("unusable CA certificate: {e}"));
                    }
                }
                let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let builder = if auth == "VerifyClientCertIfGiven" {
                    builder.allow_unauthenticated()
                } else {
                    builder
                };
                builder
                    .build()
                    .map_err(|e| l.error(format!("{TLS}.client_ca_file"), format!("client verifier: {e}")))
                    .ok()
            })
        }
        "RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert" => {
            l.error(
                &auth_field,
                format!("{auth} accepts client certificates without verifying them; use RequireAndVerifyClientCert with `client_ca_file`"),
            );
            None
        }
        other => {
            l.error(
                &auth_field,
                format!("unknown client_auth_type `{other}`, expected NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"),
            );
            None
        }
    };
    let verifier = match (spec.client_allowed_sans, verifier) {
        (Some(_), _) if auth != "RequireAndVerifyClientCert" => {
            l.error(
                format!("{TLS}.client_allowed_sans"),
                "client_allowed_sans needs `client_auth_type: RequireAndVerifyClientCert`",
            );
            None
        }
        (Some(allowed), Some(inner)) => Some(Arc::new(AllowedSans { inner, allowed }) as Arc<dyn ClientCertVerifier>),
        (_, verifier) => verifier,
    };
    let (certs, key) = (certs?, key?);
    let versions: Vec<&'static SupportedProtocolVersion> =
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, v)| v)
            .collect();
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| l.error(TLS, format!("{e}")))
        .ok()?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None if auth == "NoClientCert" => builder.with_no_client_auth(),
        None => return None,
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| {
            let field = key_field.unwrap_or_else(|| TLS.to_string());
            l.error(field, format!("certificate and key do not go together: {e}"))
        })
        .ok()?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = spec.prefer_server_cipher_suites.unwrap_or(true);
    Some(Arc::new(config))
}

/// Verifies client certificates with webpki, then requires one of the
/// configured subject alternative names (DNS, e-mail, IP or URI), as
/// exporter-toolkit's `client_allowed_sans` does.
#[derive(Debug)]
struct AllowedSans {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl AllowedSans {
    fn names(der: &CertificateDer<'_>) -> Vec<String> {
        use x509_parser::extensions::GeneralName;
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
            return Vec::new();
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return Vec::new();
        };
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => Some(s.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }
}

impl ClientCertVerifier for AllowedSans {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if Self::names(end_entity).iter().any(|n| self.allowed.contains(n)) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------
// Basic authentication.
// ---------------------------------------------------------------------------

/// A bcrypt hash (cost 10) of a password nobody has, checked for unknown
/// users so a wrong user name costs as long as a wrong password.
const DECOY_HASH: &str = "$2b$10$IRVhy7pKcSwD9nDXE5t3V.RsUwxs/lb5au2uEzARmnaJKndMO3/gW";

/// Cached verification outcomes kept at most; Prometheus presents the same
/// credentials every scrape, so a few entries carry the load.
const MAX_CACHED: usize = 256;

/// Checks basic-auth credentials against the web config's bcrypt hashes.
///
/// bcrypt is slow on purpose (~50 ms at cost 10), so outcomes are cached, as
/// exporter-toolkit does, under a keyed SHA-256 of user, hash and password: the
/// password itself is never kept. One bcrypt runs at a time, so a flood of
/// wrong passwords costs one core at most.
pub struct Authenticator {
    key: [u8; 16],
    cache: Mutex<HashMap<[u8; 32], bool>>,
    bcrypt: tokio::sync::Mutex<()>,
}

impl Default for Authenticator {
    fn default() -> Self {
        // Per-process key, so the cache keys are useless outside this process.
        let mut key = [0u8; 16];
        for half in key.chunks_mut(8) {
            half.copy_from_slice(
                &std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
                    .to_le_bytes(),
            );
        }
        Authenticator {
            key,
            cache: Mutex::new(HashMap::new()),
            bcrypt: tokio::sync::Mutex::new(()),
        }
    }
}

impl Authenticator {
    /// Whether an `Authorization` header value names a user of `config` with
    /// the right password.
    pub async fn allows(&self, config: &WebConfig, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let (hash, known) = match config.users.get(&user) {
            Some(hash) => (hash.clone(), true),
            None => (DECOY_HASH.to_string(), false),
        };
        let mut digest = Sha256::new();
        for part in [&self.key[..], user.as_bytes(), hash.as_bytes(), &password] {
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part);
        }
        let key: [u8; 32] = digest.finalize().into();
        if let Some(ok) = self.cache.lock().expect("auth cache").get(&key) {
            return *ok && known;
        }
        let _one_at_a_time = self.bcrypt.lock().await;
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        let mut cache = self.cache.lock().expect("auth cache");
        if cache.len() >= MAX_CACHED {
            // HashMap order is random per map: this evicts an arbitrary entry.
            if let Some(evict) = cache.keys().next().copied() {
                cache.remove(&evict);
            }
        }
        cache.insert(key, ok);
        ok && known
    }
}

/// `Basic base64(user:password)` -> (user, password bytes).
fn basic_credentials(value: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, text).unwrap();
        match load(&path) {
            Ok(_) => Vec::new(),
            Err(e) => {
                e.0.iter()
                    .map(|e| e.to_string().replace(&dir.path().display().to_string(), "DIR"))
                    .collect()
            }
        }
    }

    #[test]
    fn errors_name_the_file_line_and_field_and_never_the_secret() {
        let errs = errors(
            "tls_server_config:\n  cert_file: nope.pem\n  key: \"-----BEGIN PRIVATE KEY-----\\nc2VjcmV0\\n\"\n  min_version: TLS11\nhttp_server_config:\n  headers: {X-Frame-Options: allow}\nbasic_auth_users:\n  alice: hunter2\nrate_limit: {burst: 1}\n",
        );
        assert_eq!(errs.len(), 6, "{errs:#?}");
        assert_eq!(
            errs[0],
            "DIR/web.yml:9:1: field `rate_limit`: not supported by cutover-monitor; remove it"
        );
        assert_eq!(
            errs[1],
            "DIR/web.yml:4:3: field `tls_server_config.min_version`: TLS11 is not supported (rustls speaks TLS12 and TLS13)"
        );
        assert_eq!(
            errs[2],
            "DIR/web.yml:2:3: field `tls_server_config.cert_file`: cannot read DIR/nope.pem: entity not found"
        );
        assert_eq!(
            errs[3],
            "DIR/web.yml:3:3: field `tls_server_config.key`: the PEM private key is malformed"
        );
        assert!(
            errs[4]
                .starts_with("DIR/web.yml:6:13: field `http_server_config.headers.X-Frame-Options`: expected one of"),
            "{}",
            errs[4]
        );
        assert!(
            errs[5].starts_with("DIR/web.yml:8:3: field `basic_auth_users.alice`: user `alice`: not a bcrypt hash"),
            "{}",
            errs[5]
        );
        assert!(
            !errs.iter().any(|e| e.contains("hunter2") || e.contains("c2VjcmV0")),
            "{errs:#?}"
        );
    }

    #[test]
    fn unknown_fields_and_insecure_client_auth_are_refused() {
        let errs = errors("tls_server_config:\n  cert_fil: a.pem\n");
        assert!(
            errs[0].starts_with("DIR/web.yml:2:3: field `tls_server_config.cert_fil`: unknown field"),
            "{errs:#?}"
        );
        let errs = errors("tls_server_config:\n  client_auth_type: RequireAnyClientCert\n  cert: x\n  key: y\n");
        assert!(errs.iter().any(|e| e.contains("without verifying")), "{errs:#?}");
    }

    #[test]
    fn an_empty_file_serves_plain_http_to_anyone() {
        assert!(errors("").is_empty());
        assert!(errors("tls_server_config: {}\nbasic_auth_users: {}\n").is_empty());
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_and_caches_by_digest() {
        let config = WebConfig {
            users: BTreeMap::from([("alice".to_string(), bcrypt::hash("s3cret", 4).unwrap())]),
            ..WebConfig::default()
        };
        let auth = Authenticator::default();
        let header = |user: &str, pass: &str| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            HeaderValue::from_str(&format!("Basic {token}")).unwrap()
        };
        assert!(auth.allows(&config, Some(&header("alice", "s3cret"))).await);
        assert!(auth.allows(&config, Some(&header("alice", "s3cret"))).await, "cached");
        assert!(!auth.allows(&config, Some(&header("alice", "wrong"))).await);
        assert!(!auth.allows(&config, Some(&header("bob", "s3cret"))).await);
        assert!(!auth.allows(&config, None).await);
        assert!(!auth.allows(&config, Some(&HeaderValue::from_static("Bearer x"))).await);
        let cache = auth.cache.lock().unwrap();
        assert_eq!(cache.len(), 3);
        assert!(!format!("{cache:?}").contains("s3cret"));
    }
}
