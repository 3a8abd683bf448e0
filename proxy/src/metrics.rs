//! The data path's Prometheus metrics: Istio's standard TCP metrics with Istio's label names
//! (so existing dashboards work), plus authorization and HBONE gauges.
//!
//! Bytes follow Istio's meaning: `received` is what the source sent towards the destination
//! (the request direction), `sent` what came back. Every series is owned by the pod that
//! reported it and removed when that pod goes, so cardinality follows the pods on the node.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub const UNKNOWN: &str = "unknown";

/// A label value, either fixed in the code or shared with the workload store and the pod: a
/// connection's 17 traffic labels are then copies of pointers (and reference counts), not 17
/// strings allocated, hashed and freed per connection (callgrind, 2026-12-05).
#[derive(Clone)]
pub enum Text {
    Fixed(&'static str),
    Shared(Arc<str>),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match self {
            Text::Fixed(s) => s,
            Text::Shared(s) => s,
        }
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text::Fixed(s)
    }
}

impl From<Arc<str>> for Text {
    fn from(s: Arc<str>) -> Self {
        Text::Shared(s)
    }
}

impl From<&Arc<str>> for Text {
    fn from(s: &Arc<str>) -> Self {
        Text::Shared(s.clone())
    }
}

/// Equal and hashed by the text, however it is held.
impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl Hash for Text {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: Text,
    pub source_workload: Text,
    pub source_canonical_service: Text,
    pub source_workload_namespace: Text,
    pub source_principal: Text,
    pub source_app: Text,
    pub destination_workload: Text,
    pub destination_canonical_service: Text,
    pub destination_workload_namespace: Text,
    pub destination_principal: Text,
    pub destination_app: Text,
    /// The Service the connection was addressed to (`<name>.<ns>.svc.<domain>`), `unknown`
    /// when it went to a pod address; on the destination side, a Service the pod serves
    /// that port for (the VIP is not seen there), as ztunnel guesses it.
    pub destination_service: Text,
    pub destination_service_name: Text,
    pub destination_service_namespace: Text,
    pub request_protocol: Text,
    /// `-` when nothing happened; `DENY` (authorization), `CONNECT` (upstream failure).
    pub response_flags: Text,
    /// `mutual_tls` over HBONE, `unknown` for plaintext.
    pub connection_security_policy: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound` (client side) or `inbound` (server side).
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShortcutLabels {
    /// `joined` (in the map), `ipv6` (keeps TCP: the map's key is IPv4's), `failed` (the
    /// kernel refused the socket; it keeps TCP).
    pub result: String,
}

#[derive(Default)]
pub struct ProxyMetrics {
    pub opened: Family<TrafficLabels, Counter>,
    pub closed: Family<TrafficLabels, Counter>,
    pub received_bytes: Family<TrafficLabels, Counter>,
    pub sent_bytes: Family<TrafficLabels, Counter>,
    pub authz_decisions: Family<DecisionLabels, Counter>,
    pub authz_revoked: Counter,
    pub hbone_connections: Family<DirectionLabels, Gauge>,
    pub hbone_streams: Family<DirectionLabels, Gauge>,
    /// 1 while same-node HBONE goes socket to socket ([`ambit_common::sockmap`]).
    pub shortcut_enabled: Gauge,
    pub shortcut_sockets: Family<ShortcutLabels, Counter>,
    /// How many pods hold each traffic label set in their cache ([`ProxyMetrics::series`]):
    /// a set leaves the families only with its last holder. Two pods can share one (a pod
    /// re-created under its name, e.g. a StatefulSet's, before the old one's release); the
    /// first release must not take the other's series away under its cached counters.
    holders: std::sync::Mutex<HashMap<TrafficLabels, usize>>,
}

impl ProxyMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes from the source towards the destination",
            self.received_bytes.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes from the destination back to the source",
            self.sent_bytes.clone(),
        );
        r.register(
            "ambit_authz_decisions",
            "Authorization decisions at the destination",
            self.authz_decisions.clone(),
        );
        r.register(
            "ambit_authz_revoked_connections",
            "Open connections closed because a policy change denied them",
            self.authz_revoked.clone(),
        );
        r.register(
            "ambit_hbone_connections_open",
            "Open HBONE (mutual TLS, HTTP/2) connections",
            self.hbone_connections.clone(),
        );
        r.register(
            "ambit_hbone_streams_open",
            "Open HBONE CONNECT streams",
            self.hbone_streams.clone(),
        );
        r.register(
            "ambit_same_node_shortcut_enabled",
            "1 when HBONE between two pods of this node goes socket to socket in the kernel (--same-node-shortcut on and the kernel took its program), 0 when it takes TCP",
            self.shortcut_enabled.clone(),
        );
        r.register(
            "ambit_same_node_shortcut_sockets",
            "Same-node HBONE sockets offered to the shortcut, by result (joined, or kept on TCP: ipv6, failed)",
            self.shortcut_sockets.clone(),
        );
    }

    /// Counts one socket offered to the same-node shortcut.
    pub fn shortcut(&self, result: &str) {
        self.shortcut_sockets
            .get_or_create(&ShortcutLabels {
                result: result.into(),
            })
            .inc();
    }

    pub fn decision(&self, allowed: bool) {
        self.authz_decisions
            .get_or_create(&DecisionLabels {
                decision: if allowed { "allow" } else { "deny" }.into(),
            })
            .inc();
    }

    pub fn gauge(family: &Family<DirectionLabels, Gauge>, direction: &str) -> Gauge {
        family.get_or_create_owned(&DirectionLabels {
            direction: direction.into(),
        })
    }

    /// The four traffic counters of `labels`, from the pod's own cache when it has them.
    ///
    /// Why a cache: each `Family::get_or_create` hashes the whole label set (17 strings, with
    /// the standard library's SipHash) under a lock, and a connection used to make four of
    /// them, and clone the set into the pod's list: the largest share of the agents' user-space
    /// instructions per new connection after the access line (callgrind, 2026-12-05). Resolved
    /// once per pod and label set, a connection hashes the set once (aHash) and then only
    /// increments.
    pub fn series(
        &self,
        labels: TrafficLabels,
        cache: &std::sync::Mutex<PodSeries>,
    ) -> TrafficSeries {
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(&labels) {
            return s.clone();
        }
        let s = TrafficSeries {
            opened: self.opened.get_or_create_owned(&labels),
            closed: self.closed.get_or_create_owned(&labels),
            received_bytes: self.received_bytes.get_or_create_owned(&labels),
            sent_bytes: self.sent_bytes.get_or_create_owned(&labels),
        };
        // Once per pod and label set (a miss), so the second lock and clone cost nothing per
        // connection.
        *self
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(labels.clone())
            .or_default() += 1;
        cache.insert(labels, s.clone());
        s
    }

    /// Forgets series a pod reported (it is gone), those no other pod holds. A connection of
    /// the pod that ends later still holds its counters and counts into them, but they are no
    /// longer exported and no series is created again.
    pub fn forget(&self, series: &PodSeries) {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        for l in series.keys() {
            match holders.get_mut(l) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    continue;
                }
                _ => {
                    holders.remove(l);
                }
            }
            self.opened.remove(l);
            self.closed.remove(l);
            self.received_bytes.remove(l);
            self.sent_bytes.remove(l);
        }
    }
}

/// The traffic series one pod reported, by label set: removed with the pod. Hashed with aHash
/// (randomly keyed per process, as SipHash is, at a fraction of its cost over 17 strings).
pub type PodSeries = HashMap<TrafficLabels, TrafficSeries, ahash::RandomState>;

/// The traffic counters of one label set ([`ProxyMetrics::series`]).
#[derive(Clone, Debug)]
pub struct TrafficSeries {
    pub opened: Counter,
    pub closed: Counter,
    pub received_bytes: Counter,
    pub sent_bytes: Counter,
}

/// What the labels say about one end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub workload: Text,
    pub namespace: Text,
    pub principal: Text,
    pub app: Text,
}

impl Peer {
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
        }
    }
}

impl TrafficLabels {
    pub fn new(
        reporter: &'static str,
        src: &Peer,
        dst: &Peer,
        mtls: bool,
        flags: &'static str,
    ) -> Self {
        Self {
            reporter: reporter.into(),
            source_workload: src.workload.clone(),
            source_canonical_service: src.app.clone(),
            source_workload_namespace: src.namespace.clone(),
            source_principal: src.principal.clone(),
            source_app: src.app.clone(),
            destination_workload: dst.workload.clone(),
            destination_canonical_service: dst.app.clone(),
            destination_workload_namespace: dst.namespace.clone(),
            destination_principal: dst.principal.clone(),
            destination_app: dst.app.clone(),
            destination_service: UNKNOWN.into(),
            destination_service_name: UNKNOWN.into(),
            destination_service_namespace: UNKNOWN.into(),
            request_protocol: "tcp".into(),
            response_flags: flags.into(),
            connection_security_policy: if mtls { "mutual_tls" } else { UNKNOWN }.into(),
        }
    }
}

impl TrafficLabels {
    /// Names the destination Service, if the connection had one.
    pub fn with_service(mut self, service: Option<&crate::service::ServiceName>) -> Self {
        if let Some(s) = service {
            self.destination_service = (&s.hostname).into();
            self.destination_service_name = (&s.name).into();
            self.destination_service_namespace = (&s.namespace).into();
        }
        self
    }
}

/// Holds a gauge up by one while alive.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(g: Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
