//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::sync::Arc;

/// A workload identity. Ordered and hashable so it can key pools and certificate stores.
///
/// Kept as its URI, made once: every connection writes its identities into its labels and
/// access line, and a clone is a reference count, not three strings.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    uri: Arc<str>,
    /// Where the namespace and the service account start in `uri`.
    ns: usize,
    sa: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{uri:?} is not a SPIFFE workload identity (spiffe://<td>/ns/<ns>/sa/<sa>)")]
pub struct ParseError {
    pub uri: String,
}

/// A label value as Kubernetes allows it in a namespace or service-account name; also keeps
/// `/` and `%` out of identities so the URI form stays unambiguous.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

const SCHEME: &str = "spiffe://";

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        // Pieces pushed, not `format!`: a new connection looks its pod's identity up.
        let ns = SCHEME.len() + trust_domain.len() + "/ns/".len();
        let sa = ns + namespace.len() + "/sa/".len();
        let mut uri = String::with_capacity(sa + service_account.len());
        for piece in [
            SCHEME,
            trust_domain,
            "/ns/",
            namespace,
            "/sa/",
            service_account,
        ] {
            uri.push_str(piece);
        }
        Self {
            uri: uri.into(),
            ns,
            sa,
        }
    }

    /// Parses the URI form found in a certificate's URI SAN.
    pub fn parse(uri: &str) -> Result<Self, ParseError> {
        let err = || ParseError { uri: uri.into() };
        let rest = uri.strip_prefix(SCHEME).ok_or_else(err)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err());
        };
        if ![td, ns, sa].iter().all(|s| valid_segment(s)) {
            return Err(err());
        }
        Ok(Self::new(td, ns, sa))
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.ns - "/ns/".len()]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.ns..self.sa - "/sa/".len()]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.sa..]
    }

    /// The URI form, shared.
    pub fn uri(&self) -> &Arc<str> {
        &self.uri
    }

    /// The principal form used by AuthorizationPolicy: the URI without `spiffe://`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// By trust domain, namespace, then service account (not by the URI, whose `/` would sort a
/// namespace after those it is a prefix of).
impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (
            self.trust_domain(),
            self.namespace(),
            self.service_account(),
        )
            .cmp(&(
                other.trust_domain(),
                other.namespace(),
                other.service_account(),
            ))
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.trust_domain())
            .field("namespace", &self.namespace())
            .field("service_account", &self.service_account())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_uri_form() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/ratings").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "ratings"));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/ratings"
        );
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/ratings");
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "default", "ratings")
        );
    }

    #[test]
    fn identities_order_by_their_parts() {
        let id = |ns: &str, sa: &str| Identity::new("cluster.local", ns, sa);
        let mut v = vec![id("a-b", "x"), id("a", "y"), id("a", "x"), id("b", "a")];
        v.sort();
        assert_eq!(
            v,
            [id("a", "x"), id("a", "y"), id("a-b", "x"), id("b", "a")]
        );
    }

    #[test]
    fn rejects_what_is_not_a_workload_identity() {
        for bad in [
            "",
            "spiffe://",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a%2f/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
