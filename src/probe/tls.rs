//! TLS for every probe: one handshake helper that verifies against the check's
//! trust store with the production hostname, records the certificate the server
//! presented (even when verification fails) and classifies failures into the
//! `cert_*` and `tls_handshake` reasons.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Facts about the certificate a server presented, recorded even when the
/// verification failed, so old and new can be compared by fingerprint.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFacts {
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Whether the certificate covers the production hostname.
    pub name_matched: bool,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Hex SHA-256 of the DER certificate.
    pub sha256: String,
    /// The DNS names the certificate covers (subjectAltName).
    pub dns_names: Vec<String>,
}

/// Why a handshake failed, in this module's own terms (it sits below the
/// probes, which map it onto their failure reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// Anything but the certificate: protocol versions, alerts, resets.
    Handshake,
    /// The chain does not lead to a trusted CA.
    Untrusted,
    /// Expired or not yet valid.
    Expired,
    /// Does not cover the production hostname.
    NameMismatch,
}

/// A failed handshake: what kind, and a detail for people.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsError {
    /// What kind of failure.
    pub kind: TlsFailure,
    /// What happened, naming the host.
    pub detail: String,
}

/// Performs a TLS handshake over `stream`, verifying the certificate for
/// `hostname` against `roots`. The facts of the certificate the server
/// presented come back whether or not the verification succeeded.
pub async fn handshake<S>(
    stream: S,
    hostname: &str,
    roots: &Arc<RootCertStore>,
    alpn: &[&[u8]],
) -> (Result<TlsStream<S>, TlsError>, Option<CertFacts>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake_error = |detail: String| TlsError {
        kind: TlsFailure::Handshake,
        detail,
    };
    let server_name = match ServerName::try_from(hostname.to_owned()) {
        Ok(name) => name,
        Err(e) => {
            return (
                Err(handshake_error(format!("invalid TLS name {hostname:?}: {e}"))),
                None,
            );
        }
    };
    let seen = Arc::new(Mutex::new(None));
    let inner = match WebPkiServerVerifier::builder(roots.clone()).build() {
        Ok(inner) => inner,
        Err(e) => return (Err(handshake_error(format!("trust store: {e}"))), None),
    };
    let mut config = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording {
            inner,
            seen: seen.clone(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = TlsConnector::from(Arc::new(config));
    let result = connector.connect(server_name, stream).await;
    let presented = seen.lock().expect("cert slot").take();
    let facts = presented.and_then(|der| cert_facts(&der, hostname));
    let result = result.map_err(|e| TlsError {
        kind: classify_io(&e).unwrap_or(TlsFailure::Handshake),
        detail: format!("TLS handshake with {hostname}: {e}"),
    });
    (result, facts)
}

/// What kind of TLS failure an I/O error wraps, if it wraps a rustls error.
pub fn classify_io(err: &std::io::Error) -> Option<TlsFailure> {
    let inner = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(classify(inner))
}

fn classify(err: &rustls::Error) -> TlsFailure {
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::Expired,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::NameMismatch
            }
            _ => TlsFailure::Untrusted,
        },
        _ => TlsFailure::Handshake,
    }
}

/// Parses the facts dashboards compare between old and new.
pub fn cert_facts(der: &CertificateDer<'_>, hostname: &str) -> Option<CertFacts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let dns_names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let name_matched = dns_names.iter().any(|n| name_matches(n, hostname));
    Some(CertFacts {
        not_after: cert.validity().not_after.timestamp(),
        name_matched,
        issuer: cert.issuer().to_string(),
        sha256: hex(&Sha256::digest(der.as_ref())),
        dns_names,
    })
}

/// RFC 6125 matching with a single left-most wildcard label.
fn name_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Delegates verification to webpki and keeps the end-entity certificate, so
/// an expired or mismatched certificate is still described in the metrics.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().expect("cert slot") = Some(end_entity.clone().into_owned());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matches_one_label_only() {
        assert!(name_matches("*.example.test", "imap.example.test"));
        assert!(!name_matches("*.example.test", "a.imap.example.test"));
        assert!(!name_matches("*.example.test", "example.test"));
        assert!(name_matches("IMAP.example.test", "imap.EXAMPLE.test"));
        assert!(!name_matches("imap.example.test", "smtp.example.test"));
    }
}
