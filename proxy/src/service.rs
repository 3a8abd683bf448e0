//! Kubernetes Services as the data path sees them: a VIP (ClusterIP) and port lead to the
//! endpoints kube-proxy would have chosen from, and [`Service::pick`] chooses one the way
//! kube-proxy does, so that capturing a connection never changes where it may go.
//!
//! Which endpoints are candidates (Kubernetes' own rules, in this order):
//! 1. the endpoint has the Service port's target port (matched by port name in the
//!    EndpointSlice) and the VIP's address family;
//! 2. `internalTrafficPolicy: Local` keeps only this node's endpoints (none → refused, as
//!    kube-proxy drops such traffic rather than leave the node);
//! 3. ready endpoints; only when there are none, serving endpoints that are terminating
//!    (kube-proxy's `ProxyTerminatingEndpoints`);
//! 4. `trafficDistribution` narrows to the close ones when there are any: `PreferSameNode`
//!    to endpoints hinted for (or on) this node, `PreferClose` / `PreferSameZone` to those
//!    hinted for (or in) this node's zone; with no close endpoint, all stay candidates.
//!
//! The choice among candidates is uniformly random, as kube-proxy's (and ztunnel's default
//! weight of 1): the agent sees only its own node's connections, so a least-loaded or
//! power-of-two-choices pick would balance on a partial, per-node view and skew whenever
//! clients are unevenly spread over nodes; random needs no shared state on the connection
//! path and matches what the app got before it was captured. `sessionAffinity: ClientIP` is
//! kept by rendezvous hashing of (client IP, endpoint): a client stays on its endpoint while
//! that endpoint stays a candidate, and only the clients of a removed endpoint move.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Which Service a connection was addressed to (telemetry).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    /// Shared: a connection to the Service puts them in its metric labels.
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub hostname: Arc<str>,
}

/// An endpoint's readiness, from its EndpointSlice conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Readiness {
    /// Neither ready nor serving while terminating: never a candidate.
    Unready,
    /// Terminating but still serving: a candidate only when no endpoint is ready.
    Terminating,
    Ready,
}

/// One backend of one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Endpoint address and target port.
    pub addr: SocketAddr,
    pub readiness: Readiness,
    /// On this node.
    pub local: bool,
    /// What `trafficDistribution` prefers for this node (by the slice's hints, or the
    /// endpoint's node or zone where the slice carries no hints).
    pub close: bool,
}

/// `trafficDistribution` of a Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Distribution {
    #[default]
    Any,
    /// `PreferSameNode`: [`Endpoint::close`] means this node.
    PreferSameNode,
    /// `PreferClose` / `PreferSameZone`: [`Endpoint::close`] means this node's zone.
    PreferSameZone,
}

/// One port of a Service and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub port: u16,
    pub endpoints: Vec<Endpoint>,
}

/// A Service reachable at one or more VIPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: Arc<ServiceName>,
    pub ports: Vec<Port>,
    /// `internalTrafficPolicy: Local`.
    pub node_local: bool,
    pub distribution: Distribution,
    /// `sessionAffinity: ClientIP`.
    pub client_affinity: bool,
}

/// Why no endpoint was chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoEndpoint {
    #[error("Service {service} has no port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("no ready endpoint for Service {service} port {port}")]
    NoneReady { service: String, port: u16 },
    #[error(
        "no ready endpoint on this node for Service {service} port {port} (internalTrafficPolicy: Local)"
    )]
    NoneLocal { service: String, port: u16 },
    #[error(
        "{vip} is in the cluster's Service range but no known Service: refused rather than sent in plaintext"
    )]
    UnknownService { vip: std::net::SocketAddr },
}

impl Service {
    /// Chooses the endpoint for a connection from `client` to `vip` (one of this Service's
    /// VIPs and ports).
    pub fn pick(&self, vip: SocketAddr, client: IpAddr) -> Result<&Endpoint, NoEndpoint> {
        let service = || self.name.hostname.to_string();
        let port = self
            .ports
            .iter()
            .find(|p| p.port == vip.port())
            .ok_or_else(|| NoEndpoint::NoSuchPort {
                service: service(),
                port: vip.port(),
            })?;
        let v4 = vip.ip().to_canonical().is_ipv4();
        let family = port
            .endpoints
            .iter()
            .filter(|e| e.addr.ip().is_ipv4() == v4)
            .filter(|e| !self.node_local || e.local);
        let mut candidates: Vec<&Endpoint> = family
            .clone()
            .filter(|e| e.readiness == Readiness::Ready)
            .collect();
        if candidates.is_empty() {
            candidates = family
                .filter(|e| e.readiness == Readiness::Terminating)
                .collect();
        }
        if self.distribution != Distribution::Any && candidates.iter().any(|e| e.close) {
            candidates.retain(|e| e.close);
        }
        if candidates.is_empty() {
            let port = vip.port();
            return Err(if self.node_local {
                NoEndpoint::NoneLocal {
                    service: service(),
                    port,
                }
            } else {
                NoEndpoint::NoneReady {
                    service: service(),
                    port,
                }
            });
        }
        let chosen = if self.client_affinity {
            rendezvous(&candidates, client)
        } else {
            candidates[fastrand::usize(..candidates.len())]
        };
        Ok(chosen)
    }
}

/// The candidate with the highest hash of (client, endpoint): stable for a client while its
/// endpoint stays, and a removed endpoint moves only its own clients.
fn rendezvous<'a>(candidates: &[&'a Endpoint], client: IpAddr) -> &'a Endpoint {
    let score = |e: &Endpoint| {
        // SipHash with fixed keys: the same on every node and across restarts.
        let mut h = std::hash::DefaultHasher::new();
        client.to_canonical().hash(&mut h);
        e.addr.hash(&mut h);
        h.finish()
    };
    candidates
        .iter()
        .copied()
        .max_by_key(|e| score(e))
        .expect("callers pass at least one candidate")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, readiness: Readiness, local: bool, close: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            readiness,
            local,
            close,
        }
    }

    fn svc(endpoints: Vec<Endpoint>) -> Service {
        Service {
            name: Arc::new(ServiceName {
                name: "ratings".into(),
                namespace: "default".into(),
                hostname: "ratings.default.svc.cluster.local".into(),
            }),
            ports: vec![Port {
                port: 9080,
                endpoints,
            }],
            node_local: false,
            distribution: Distribution::Any,
            client_affinity: false,
        }
    }

    const VIP: &str = "10.96.0.10:9080";
    const CLIENT: &str = "10.0.0.2";

    /// The set of endpoints `pick` returns over many tries.
    fn picks(s: &Service, vip: &str, client: &str) -> std::collections::BTreeSet<SocketAddr> {
        (0..400)
            .map(|_| {
                s.pick(vip.parse().unwrap(), client.parse().unwrap())
                    .unwrap()
                    .addr
            })
            .collect()
    }

    fn set(addrs: &[&str]) -> std::collections::BTreeSet<SocketAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn ready_endpoints_of_the_vip_family_and_port_are_chosen_at_random() {
        let s = svc(vec![
            ep("10.1.0.1:7100", Readiness::Ready, false, false),
            ep("10.1.0.2:7100", Readiness::Ready, false, false),
            ep("10.1.0.3:7100", Readiness::Unready, false, false),
            ep("10.1.0.4:7100", Readiness::Terminating, false, false),
            ep("[fd00::1]:7100", Readiness::Ready, false, false),
        ]);
        assert_eq!(
            picks(&s, VIP, CLIENT),
            set(&["10.1.0.1:7100", "10.1.0.2:7100"])
        );
        assert_eq!(
            picks(&s, "[fd00:96::10]:9080", "fd00::9"),
            set(&["[fd00::1]:7100"])
        );
        assert_eq!(
            s.pick("10.96.0.10:9081".parse().unwrap(), CLIENT.parse().unwrap()),
            Err(NoEndpoint::NoSuchPort {
                service: "ratings.default.svc.cluster.local".into(),
                port: 9081
            })
        );
    }

    #[test]
    fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
        let mut s = svc(vec![
            ep("10.1.0.3:7100", Readiness::Unready, false, false),
            ep("10.1.0.4:7100", Readiness::Terminating, false, false),
        ]);
        assert_eq!(picks(&s, VIP, CLIENT), set(&["10.1.0.4:7100"]));
        s.ports[0].endpoints.remove(1);
        assert!(matches!(
            s.pick(VIP.parse().unwrap(), CLIENT.parse().unwrap()),
            Err(NoEndpoint::NoneReady { port: 9080, .. })
        ));
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_node_s_endpoints_or_refuses() {
        let mut s = svc(vec![
            ep("10.1.0.1:7100", Readiness::Ready, true, false),
            ep("10.1.0.2:7100", Readiness::Ready, false, false),
        ]);
        s.node_local = true;
        assert_eq!(picks(&s, VIP, CLIENT), set(&["10.1.0.1:7100"]));
        s.ports[0].endpoints[0].readiness = Readiness::Unready;
        assert!(matches!(
            s.pick(VIP.parse().unwrap(), CLIENT.parse().unwrap()),
            Err(NoEndpoint::NoneLocal { .. })
        ));
    }

    #[test]
    fn traffic_distribution_prefers_close_endpoints_and_falls_back_to_all() {
        let mut s = svc(vec![
            ep("10.1.0.1:7100", Readiness::Ready, true, true),
            ep("10.1.0.2:7100", Readiness::Ready, false, false),
        ]);
        assert_eq!(
            picks(&s, VIP, CLIENT).len(),
            2,
            "without trafficDistribution a close endpoint has no preference"
        );
        s.distribution = Distribution::PreferSameNode;
        assert_eq!(picks(&s, VIP, CLIENT), set(&["10.1.0.1:7100"]));
        s.ports[0].endpoints[0].readiness = Readiness::Unready;
        assert_eq!(picks(&s, VIP, CLIENT), set(&["10.1.0.2:7100"]));
    }

    #[test]
    fn client_ip_affinity_keeps_a_client_on_its_endpoint_and_moves_only_a_removed_one_s() {
        let eps: Vec<Endpoint> = (1..=5)
            .map(|i| ep(&format!("10.1.0.{i}:7100"), Readiness::Ready, false, false))
            .collect();
        let mut s = svc(eps);
        s.client_affinity = true;
        let clients: Vec<String> = (1..=64).map(|i| format!("10.0.1.{i}")).collect();
        let before: Vec<SocketAddr> = clients
            .iter()
            .map(|c| {
                let p = picks(&s, VIP, c);
                assert_eq!(p.len(), 1, "client {c} moved between endpoints: {p:?}");
                *p.first().unwrap()
            })
            .collect();
        assert!(
            before
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1,
            "clients spread over endpoints"
        );
        let gone: SocketAddr = "10.1.0.3:7100".parse().unwrap();
        s.ports[0].endpoints.retain(|e| e.addr != gone);
        for (c, was) in clients.iter().zip(&before) {
            let now = s.pick(VIP.parse().unwrap(), c.parse().unwrap()).unwrap();
            if *was != gone {
                assert_eq!(
                    now.addr, *was,
                    "client {c} moved though its endpoint stayed"
                );
            }
        }
    }
}
