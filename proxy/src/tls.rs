//! TLS for HBONE (rustls): TLS 1.3 only, AES-GCM suites, ALPN `h2`, no SNI, no resumption.
//!
//! Peers are verified by SPIFFE identity, not by DNS name: a client checks that the server's
//! certificate chains to the mesh roots and carries the *expected* URI SAN (the destination's
//! identity from the workload store); a server requires a client certificate that chains to
//! the roots and belongs to its trust domain. Which client may do what is left to
//! authorization. rustls's own web-PKI verifiers check names, so the name part is ours.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::identity::Identity;

pub const ALPN_H2: &[u8] = b"h2";

/// ring with the suites ztunnel uses: AES-256-GCM and AES-128-GCM (no ChaCha20).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ];
        Arc::new(p)
    })
    .clone()
}

/// Where certificates come from: the node agent's certificate manager.
pub trait Certificates: Send + Sync + 'static {
    /// The current certificate and key of `id` (issued on first use, renewed at half-life).
    fn certified_key(&self, id: &Identity) -> Result<Arc<CertifiedKey>, String>;
    /// The roots every peer certificate must chain to.
    fn roots(&self) -> Arc<RootCertStore>;
}

/// The SPIFFE identities in a certificate's URI SANs (others are ignored).
pub fn identities(cert: &CertificateDer<'_>) -> Vec<Identity> {
    uri_sans(cert)
        .iter()
        .filter_map(|u| Identity::parse(u).ok())
        .collect()
}

/// Every URI SAN of a certificate (none if it does not parse).
fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// When a certificate stops being valid (its notAfter), as an `Instant`; now if it cannot be
/// read or has passed.
pub fn expiry(cert: &CertificateDer<'_>) -> std::time::Instant {
    use std::time::{Duration, Instant, SystemTime};
    let not_after = x509_parser::parse_x509_certificate(cert)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
        .and_then(|t| u64::try_from(t).ok())
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t));
    let left = not_after
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    Instant::now() + left
}

/// The identity of an X.509-SVID: exactly one URI SAN, a SPIFFE ID (the SVID specification
/// allows no second one — a certificate naming two identities could be accepted as either).
pub fn svid_identity(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    match uri_sans(cert).as_slice() {
        [one] => {
            Identity::parse(one).map_err(|e| format!("URI SAN {one:?} is not a SPIFFE ID: {e}"))
        }
        sans => Err(format!(
            "an X.509-SVID has exactly one URI SAN, this certificate has {} [{}]",
            sans.len(),
            sans.join(", ")
        )),
    }
}

fn rejected(msg: String) -> rustls::Error {
    #[derive(Debug)]
    struct Msg(String);
    impl std::fmt::Display for Msg {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Msg {}
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Msg(msg)))))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Client side: chain to the roots, then the certificate's one URI SAN must be an expected
/// identity.
#[derive(Debug)]
struct ExpectIdentity {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let presented = svid_identity(end_entity).map_err(rejected)?;
        if self.expected.contains(&presented) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rejected(format!(
            "peer did not present the expected identity: expected {}, got [{presented}]",
            list(&self.expected),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn list(ids: &[Identity]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Server side: the web-PKI client verifier (chain, expiry, clientAuth usage), then the
/// client's one identity must be of our trust domain.
#[derive(Debug)]
struct SameTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SameTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = svid_identity(end_entity).map_err(rejected)?;
        if presented.trust_domain() == self.trust_domain {
            return Ok(ClientCertVerified::assertion());
        }
        Err(rejected(format!(
            "client identity [{presented}] is not in trust domain {}",
            self.trust_domain
        )))
    }

    fn client_auth_mandatory(&self) -> bool {
        true
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

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The client configuration of one HBONE connection: our certificate, and the identity the
/// destination must prove.
pub fn client_config(
    cert: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
) -> Result<ClientConfig, rustls::Error> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectIdentity { roots, expected }))
        .with_client_cert_resolver(Arc::new(FixedClientCert(cert)));
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    c.enable_sni = false;
    c.resumption = Resumption::disabled();
    Ok(c)
}

/// The server configuration of one pod's 15008 listener; `resolver` picks the pod's current
/// certificate at each handshake, so renewal never touches open connections.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<ServerConfig, rustls::Error> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
    let verifier = Arc::new(SameTrustDomain {
        inner,
        trust_domain: trust_domain.into(),
    });
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    c.send_tls13_tickets = 0;
    Ok(c)
}

/// Resolves a server certificate through a function (the pod's identity can change when its
/// Pod object arrives after the CNI ADD).
pub struct ResolveWith<F>(pub F);

impl<F> std::fmt::Debug for ResolveWith<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResolveWith")
    }
}

impl<F> ResolvesServerCert for ResolveWith<F>
where
    F: Fn() -> Option<Arc<CertifiedKey>> + Send + Sync,
{
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    };

    use super::*;

    /// A CA and a leaf signed by it for each set of URI SANs.
    fn ca_and_leaves(sans: &[&[&str]]) -> (Arc<RootCertStore>, Vec<CertificateDer<'static>>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = p.self_signed(&key).unwrap();
        let issuer = Issuer::new(p, key);
        let mut roots = RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        let leaves = sans
            .iter()
            .map(|uris| {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
                let mut p = CertificateParams::default();
                p.subject_alt_names = uris
                    .iter()
                    .map(|u| SanType::URI((*u).try_into().unwrap()))
                    .collect();
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                p.signed_by(&key, &issuer).unwrap().der().clone()
            })
            .collect();
        (Arc::new(roots), leaves)
    }

    #[test]
    fn an_svid_has_exactly_one_uri_san_on_both_sides_of_a_handshake() {
        let me = "spiffe://td/ns/shop/sa/web";
        let (roots, leaves) = ca_and_leaves(&[
            &[me],
            &[me, "spiffe://td/ns/shop/sa/admin"],
            &[],
            &["https://example.com/web"],
        ]);
        let client_side = ExpectIdentity {
            roots: roots.clone(),
            expected: vec![Identity::parse(me).unwrap()],
        };
        let server_side = SameTrustDomain {
            inner: rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .unwrap(),
            trust_domain: "td".into(),
        };
        let name = ServerName::try_from("web.shop").unwrap();
        let now = UnixTime::now();
        let as_server = |c: &CertificateDer<'_>| {
            client_side
                .verify_server_cert(c, &[], &name, &[], now)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let as_client = |c: &CertificateDer<'_>| {
            server_side
                .verify_client_cert(c, &[], now)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(as_server(&leaves[0]), Ok(()));
        assert_eq!(as_client(&leaves[0]), Ok(()));
        for (leaf, why) in [
            (&leaves[1], "exactly one URI SAN, this certificate has 2"),
            (&leaves[2], "exactly one URI SAN, this certificate has 0"),
            (&leaves[3], "is not a SPIFFE ID"),
        ] {
            for (side, r) in [("server", as_server(leaf)), ("client", as_client(leaf))] {
                assert!(
                    r.as_ref().is_err_and(|e| e.contains(why)),
                    "a {side} certificate: {r:?}, wanted {why:?}"
                );
            }
        }
    }
}
