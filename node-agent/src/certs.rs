//! One certificate per identity present on the node, issued by the [`Ca`] on first use and
//! renewed at half its lifetime. A renewal only changes what new handshakes present: open
//! connections keep the certificate they were established with.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ambit_proxy::identity::Identity;
use ambit_proxy::tls::Certificates;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use crate::ca::{Ca, Issued};
use crate::metrics::{AgentMetrics, IdentityLabels};

pub struct CertManager {
    ca: Ca,
    lifetime: Duration,
    certs: Mutex<HashMap<Identity, Arc<Issued>>>,
    metrics: Option<Arc<AgentMetrics>>,
}

/// What can be shown of a certificate (no key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    pub serial: String,
    pub not_after: SystemTime,
}

impl CertManager {
    pub fn new(ca: Ca, lifetime: Duration) -> Self {
        Self {
            ca,
            lifetime,
            certs: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// Keeps `ambit_certificate_expiry_timestamp_seconds` in step with the certificates held.
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn expiry_gauge(&self, id: &Identity, not_after: Option<SystemTime>) {
        let Some(m) = &self.metrics else { return };
        let labels = IdentityLabels {
            identity: id.to_string(),
        };
        match not_after {
            Some(t) => {
                let at = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                m.cert_expiry.get_or_create(&labels).set(at.as_secs_f64());
            }
            None => {
                m.cert_expiry.remove(&labels);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<Issued>>> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn issue(&self, id: &Identity) -> Result<Arc<Issued>, crate::ca::Error> {
        let issued = Arc::new(self.ca.issue(id, self.lifetime)?);
        info!(identity = %id, serial = %issued.serial,
            valid_seconds = self.lifetime.as_secs_f64(), "certificate issued");
        self.expiry_gauge(id, Some(issued.not_after));
        Ok(issued)
    }

    /// The current certificate of `id`, issuing or renewing it when due.
    pub fn get(&self, id: &Identity) -> Result<Arc<Issued>, crate::ca::Error> {
        let mut certs = self.lock();
        if let Some(c) = certs.get(id)
            && SystemTime::now() < c.refresh_at()
        {
            return Ok(c.clone());
        }
        match self.issue(id) {
            Ok(c) => {
                certs.insert(id.clone(), c.clone());
                Ok(c)
            }
            // A renewal that fails keeps serving the old certificate while it is valid.
            Err(e) => match certs.get(id) {
                Some(old) if SystemTime::now() < old.not_after => {
                    warn!(identity = %id, "certificate renewal failed, keeping the current one: {e}");
                    Ok(old.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// Renews every certificate past half-life and drops those of identities no longer on
    /// the node; returns how many were renewed.
    pub fn maintain(&self, present: &HashSet<Identity>) -> usize {
        let due: Vec<Identity> = {
            let mut certs = self.lock();
            certs.retain(|id, _| {
                let keep = present.contains(id);
                if !keep {
                    self.expiry_gauge(id, None);
                }
                keep
            });
            let now = SystemTime::now();
            certs
                .iter()
                .filter(|(_, c)| now >= c.refresh_at())
                .map(|(id, _)| id.clone())
                .collect()
        };
        due.iter().filter(|id| self.get(id).is_ok()).count()
    }

    /// Certificates held now, for logs and the admin view.
    pub fn list(&self) -> Vec<CertInfo> {
        let mut v: Vec<CertInfo> = self
            .lock()
            .values()
            .map(|c| CertInfo {
                identity: c.identity.clone(),
                serial: c.serial.clone(),
                not_after: c.not_after,
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    pub fn ca_description(&self) -> &str {
        &self.ca.description
    }
}

impl Certificates for CertManager {
    fn certified_key(&self, id: &Identity) -> Result<Arc<CertifiedKey>, String> {
        self.get(id)
            .map(|c| c.key.clone())
            .map_err(|e| e.to_string())
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.ca.roots()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Source;

    #[test]
    fn renews_at_half_life_and_forgets_absent_identities() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load(
            &Source::Embedded {
                dir: dir.path().to_owned(),
            },
            "td",
        )
        .unwrap();
        let m = CertManager::new(ca, Duration::from_secs(2));
        let a = Identity::new("td", "ns", "a");
        let first = m.get(&a).unwrap();
        assert_eq!(m.get(&a).unwrap().serial, first.serial, "not due yet");
        std::thread::sleep(Duration::from_millis(1050));
        let present: HashSet<Identity> = [a.clone()].into();
        assert_eq!(m.maintain(&present), 1);
        assert_ne!(m.get(&a).unwrap().serial, first.serial, "renewed");
        m.maintain(&HashSet::new());
        assert!(m.list().is_empty());
    }
}
