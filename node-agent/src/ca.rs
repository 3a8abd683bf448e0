//! The certificate authority that signs workload certificates.
//!
//! Embedded (default): a root generated on first start and kept in the state directory (key
//! mode 0600), so a restarted agent keeps its trust. Plug-in: a CA certificate and key (and
//! optionally the chain up to the root) loaded from files, e.g. a Kubernetes Secret mounted on
//! every node, so agents of different nodes trust each other. Keys never reach a log.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_proxy::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("loading a private key into rustls: {0}")]
    Key(#[from] rustls::Error),
}

/// Where the CA comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Generated once, kept in this directory.
    Embedded { dir: PathBuf },
    /// Loaded from files; `chain` holds the certificates above `cert`, ending with the root.
    Files {
        cert: PathBuf,
        key: PathBuf,
        chain: Option<PathBuf>,
    },
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Sent after each leaf: the CA certificate and its intermediates (never needed roots).
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    /// For logs: where the CA came from and the root's subject.
    pub description: String,
}

/// A workload certificate with its validity.
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub identity: Identity,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl Issued {
    /// Renewal is due at half the lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, what: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = std::fs::read(path).map_err(io_err(path))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// Writes `data` to `path` with `mode`, atomically (temporary file, then rename).
fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A self-signed ECDSA P-256 root for `trust_domain`, valid for ten years.
pub fn generate_root(trust_domain: &str) -> Result<(String, String), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "Ambit embedded root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Ca {
    pub fn load(source: &Source, trust_domain: &str) -> Result<Self, Error> {
        match source {
            Source::Embedded { dir } => {
                let (cert, key) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
                if !cert.exists() || !key.exists() {
                    let (c, k) = generate_root(trust_domain)?;
                    // Key first: a cert without its key is useless, a key alone is rewritten.
                    write_private(&key, k.as_bytes(), 0o600)?;
                    write_private(&cert, c.as_bytes(), 0o644)?;
                    tracing::info!(cert = %cert.display(), "generated the embedded root CA");
                }
                Self::from_files(&cert, &key, None, "embedded")
            }
            Source::Files { cert, key, chain } => {
                Self::from_files(cert, key, chain.as_deref(), "plug-in")
            }
        }
    }

    fn from_files(
        cert: &Path,
        key: &Path,
        chain: Option<&Path>,
        kind: &str,
    ) -> Result<Self, Error> {
        let ca_cert = read_certs(cert)?.remove(0);
        let key_pem = std::fs::read_to_string(key).map_err(io_err(key))?;
        let key_pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(key, format!("not a PEM private key: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&ca_cert)
            .map_err(|e| invalid(cert, format!("not an X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(invalid(
                cert,
                "the certificate is not a CA (basicConstraints)",
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
            return Err(invalid(
                key,
                format!("the key does not belong to {}", cert.display()),
            ));
        }
        let above = match chain {
            Some(p) => read_certs(p)?,
            None => Vec::new(),
        };
        let root = above.last().cloned().unwrap_or_else(|| ca_cert.clone());
        let mut roots = RootCertStore::empty();
        roots
            .add(root.clone())
            .map_err(|e| invalid(chain.unwrap_or(cert), format!("unusable root: {e}")))?;
        let mut sent = Vec::new();
        if !above.is_empty() {
            sent.push(ca_cert.clone());
            sent.extend(above[..above.len() - 1].iter().cloned());
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key_pair)
            .map_err(|e| invalid(cert, format!("cannot sign with this CA: {e}")))?;
        let root_subject = x509_parser::parse_x509_certificate(&root)
            .map(|(_, r)| r.subject().to_string())
            .unwrap_or_default();
        Ok(Self {
            issuer,
            chain: sent,
            roots: Arc::new(roots),
            description: format!("{kind} CA {}, root {root_subject:?}", cert.display()),
        })
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// A fresh key and certificate for `id`: ECDSA P-256, one critical URI SAN, valid from a
    /// little before now (clock skew between nodes) for `lifetime`.
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let skew = (lifetime / 4).min(Duration::from_secs(60));
        params.not_before = (now - skew).into();
        params.not_after = (now + lifetime).into();
        let cert = params.signed_by(&key, &self.issuer)?;
        let serial = x509_parser::parse_x509_certificate(cert.der())
            .map(|(_, c)| c.raw_serial_as_string())
            .unwrap_or_default();
        let mut certs = vec![cert.der().clone()];
        certs.extend(self.chain.iter().cloned());
        let signer =
            ambit_proxy::tls::provider()
                .key_provider
                .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                    key.serialize_der(),
                )))?;
        Ok(Issued {
            key: Arc::new(CertifiedKey::new(certs, signer)),
            identity: id.clone(),
            issued_at: now,
            not_after: now + lifetime,
            serial,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_root_is_kept_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let src = Source::Embedded {
            dir: dir.path().to_owned(),
        };
        let a = Ca::load(&src, "cluster.local").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("ca-key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let b = Ca::load(&src, "cluster.local").unwrap();
        assert_eq!(
            a.roots().roots,
            b.roots().roots,
            "a restart keeps the same root"
        );
        let id = Identity::new("cluster.local", "default", "ratings");
        let issued = b.issue(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(ambit_proxy::tls::identities(&issued.key.cert[0]), vec![id]);
        assert!(issued.refresh_at() < issued.not_after);
    }

    /// deploy/make-ca.sh, the documented way to make a cluster's CA, yields a CA the agent
    /// loads and issues from.
    #[test]
    fn the_documented_openssl_ca_loads() {
        let dir = tempfile::tempdir().unwrap();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/make-ca.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir.path().join("ca"))
            .output()
            .expect("running deploy/make-ca.sh (needs openssl)");
        assert!(out.status.success(), "{out:?}");
        let src = Source::Files {
            cert: dir.path().join("ca/ca.crt"),
            key: dir.path().join("ca/ca.key"),
            chain: None,
        };
        let ca = Ca::load(&src, "cluster.local").unwrap();
        assert!(
            ca.description.contains("ambit root CA"),
            "{}",
            ca.description
        );
    }

    #[test]
    fn mismatched_key_and_non_ca_certificates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, _) = generate_root("a").unwrap();
        let (_, k2) = generate_root("b").unwrap();
        std::fs::write(dir.path().join("c.pem"), c1).unwrap();
        std::fs::write(dir.path().join("k.pem"), k2).unwrap();
        let err = Ca::load(
            &Source::Files {
                cert: dir.path().join("c.pem"),
                key: dir.path().join("k.pem"),
                chain: None,
            },
            "a",
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let err = Ca::load(
            &Source::Files {
                cert: dir.path().join("missing.pem"),
                key: dir.path().join("k.pem"),
                chain: None,
            },
            "a",
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
