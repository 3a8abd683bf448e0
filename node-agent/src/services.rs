//! Services and EndpointSlices: each object is converted at its source into a compact record
//! (only what resolving a VIP needs), and the store indexes the records of all sources by VIP
//! ([`Index`]) for the data path ([`ambit_proxy::service`]).
//!
//! What is indexed, as kube-proxy reads the same objects:
//! - a Service's VIPs are `spec.clusterIPs` (or `clusterIP`), IPv4 and IPv6; headless
//!   Services (`None`) and ExternalName Services have none — DNS gives their clients pod
//!   addresses or a name, which the pod path serves;
//! - its TCP ports, each matched by **name** to the ports of the EndpointSlices labelled
//!   `kubernetes.io/service-name: <service>` (so a named `targetPort` resolves per slice);
//! - each endpoint's first address (Kubernetes: the addresses of one endpoint are
//!   fungible), its conditions (`ready` absent = ready, `serving` absent = ready,
//!   `terminating` absent = false), `nodeName`, `zone` and `hints.forZones`;
//! - `internalTrafficPolicy`, `trafficDistribution` and `sessionAffinity`.
//!
//! Slices of address type FQDN, ports without a number and non-TCP ports are skipped.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_proxy::service::{Distribution, Endpoint, Port, Readiness, Service, ServiceName};
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the agent keeps of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub vips: Vec<IpAddr>,
    /// (port name, port number), TCP only.
    pub ports: Vec<(String, u16)>,
    pub node_local: bool,
    pub distribution: Distribution,
    pub client_affinity: bool,
}

/// What the agent keeps of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// The Service (same namespace) this slice belongs to.
    pub service: String,
    /// (port name, target port number), TCP only.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<EndpointRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    pub ip: IpAddr,
    pub readiness: Readiness,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones`, when the slice controller set them.
    pub hint_zones: Option<Vec<String>>,
}

fn tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// Converts a Service; `Ok(None)` for one that never has a VIP (headless, ExternalName).
pub fn service_record(svc: &KubeService) -> Result<Option<ServiceRecord>, String> {
    let Some(spec) = &svc.spec else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut listed: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if listed.is_empty() {
        listed.extend(spec.cluster_ip.as_deref());
    }
    let mut vips = Vec::new();
    for ip in listed {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("spec.clusterIPs: {ip:?} is not an IP address"))?;
        vips.push(ip.to_canonical());
    }
    if vips.is_empty() {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if !tcp(p.protocol.as_deref()) {
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("spec.ports: {} is not a port", p.port))?;
        ports.push((p.name.clone().unwrap_or_default(), port));
    }
    let distribution = match spec.traffic_distribution.as_deref() {
        Some("PreferSameNode") => Distribution::PreferSameNode,
        Some("PreferClose" | "PreferSameZone") => Distribution::PreferSameZone,
        _ => Distribution::Any,
    };
    Ok(Some(ServiceRecord {
        vips,
        ports,
        node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        distribution,
        client_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
    }))
}

/// Converts an EndpointSlice; `Ok(None)` for one that serves no Service the agent resolves
/// (no `kubernetes.io/service-name` label, or FQDN addresses).
pub fn slice_record(slice: &EndpointSlice) -> Result<Option<SliceRecord>, String> {
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
    else {
        return Ok(None);
    };
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        if !tcp(p.protocol.as_deref()) {
            continue;
        }
        let Some(n) = p.port else { continue };
        let port = u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("ports: {n} is not a port"))?;
        ports.push((p.name.clone().unwrap_or_default(), port));
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for e in &slice.endpoints {
        let Some(first) = e.addresses.first() else {
            continue;
        };
        let ip: IpAddr = first
            .parse()
            .map_err(|_| format!("endpoints: {first:?} is not an IP address"))?;
        let c = e.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let readiness = if ready && !terminating {
            Readiness::Ready
        } else if serving && terminating {
            Readiness::Terminating
        } else {
            Readiness::Unready
        };
        endpoints.push(EndpointRecord {
            ip: ip.to_canonical(),
            readiness,
            node: e.node_name.clone(),
            zone: e.zone.clone(),
            hint_zones: e
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect()),
        });
    }
    Ok(Some(SliceRecord {
        service: service.clone(),
        ports,
        endpoints,
    }))
}

/// What resolving Services needs to know of this node and cluster.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    /// This node's name (the endpoints' `nodeName`); unknown, no endpoint is local.
    pub node: Option<String>,
    /// This node's zone; unknown, it is learned from an endpoint on this node.
    pub zone: Option<String>,
    /// The cluster's DNS domain (Service hostnames).
    pub cluster_domain: String,
    /// The cluster's Service (ClusterIP) ranges: a destination in them that is no Service the
    /// agent knows is refused instead of forwarded in plaintext. Empty: no such check.
    pub service_cidrs: Vec<ipnet::IpNet>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            node: None,
            zone: None,
            cluster_domain: "cluster.local".into(),
            service_cidrs: Vec::new(),
        }
    }
}

/// Services by VIP, and endpoints back to a Service (telemetry), built from records.
#[derive(Default)]
pub struct Index {
    pub by_vip: HashMap<IpAddr, Arc<Service>>,
    pub by_endpoint: HashMap<SocketAddr, Arc<ServiceName>>,
    /// (namespace, name) → the Service, for the admin view.
    pub services: BTreeMap<(String, String), (Vec<IpAddr>, Arc<Service>)>,
}

type Key = (String, String);

impl Index {
    pub fn build(
        services: &BTreeMap<Key, Arc<ServiceRecord>>,
        slices: &BTreeMap<Key, Arc<SliceRecord>>,
        loc: &ServiceSettings,
    ) -> Self {
        let mut of_service: HashMap<(&str, &str), Vec<&SliceRecord>> = HashMap::new();
        for ((ns, _), s) in slices {
            of_service
                .entry((ns.as_str(), s.service.as_str()))
                .or_default()
                .push(s);
        }
        let local = |e: &EndpointRecord| loc.node.is_some() && e.node == loc.node;
        let zone = loc.zone.clone().or_else(|| {
            slices
                .values()
                .flat_map(|s| &s.endpoints)
                .find(|e| local(e) && e.zone.is_some())
                .and_then(|e| e.zone.clone())
        });
        let mut index = Index::default();
        for ((ns, name), svc) in services {
            let sname = Arc::new(ServiceName {
                name: name.clone(),
                namespace: ns.clone(),
                hostname: format!("{name}.{ns}.svc.{}", loc.cluster_domain),
            });
            let close = |e: &EndpointRecord| match svc.distribution {
                Distribution::Any => false,
                Distribution::PreferSameNode => local(e),
                Distribution::PreferSameZone => match (&e.hint_zones, &zone) {
                    (Some(hints), Some(z)) => hints.contains(z),
                    (None, Some(z)) => e.zone.as_ref() == Some(z),
                    (_, None) => false,
                },
            };
            let slices = of_service
                .get(&(ns.as_str(), name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut ports = Vec::with_capacity(svc.ports.len());
            for (port_name, port) in &svc.ports {
                // One entry per address: an endpoint moving between slices is listed twice
                // for a moment; the better readiness wins.
                let mut endpoints: Vec<Endpoint> = Vec::new();
                let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
                for s in slices {
                    let Some((_, target)) = s.ports.iter().find(|(n, _)| n == port_name) else {
                        continue;
                    };
                    for e in &s.endpoints {
                        let ep = Endpoint {
                            addr: SocketAddr::new(e.ip, *target),
                            readiness: e.readiness,
                            local: local(e),
                            close: close(e),
                        };
                        match seen.get(&ep.addr) {
                            Some(&i) if endpoints[i].readiness >= ep.readiness => {}
                            Some(&i) => endpoints[i] = ep,
                            None => {
                                seen.insert(ep.addr, endpoints.len());
                                endpoints.push(ep);
                            }
                        }
                    }
                }
                endpoints.shrink_to_fit();
                for e in &endpoints {
                    index
                        .by_endpoint
                        .entry(e.addr)
                        .or_insert_with(|| sname.clone());
                }
                ports.push(Port {
                    port: *port,
                    endpoints,
                });
            }
            let service = Arc::new(Service {
                name: sname,
                ports,
                node_local: svc.node_local,
                distribution: svc.distribution,
                client_affinity: svc.client_affinity,
            });
            for vip in &svc.vips {
                index.by_vip.insert(*vip, service.clone());
            }
            index
                .services
                .insert((ns.clone(), name.clone()), (svc.vips.clone(), service));
        }
        index
    }

    /// (Services with a VIP, endpoints over all their ports).
    pub fn counts(&self) -> (usize, usize) {
        let endpoints = self
            .services
            .values()
            .flat_map(|(_, s)| &s.ports)
            .map(|p| p.endpoints.len())
            .sum();
        (self.services.len(), endpoints)
    }

    /// The Services and their endpoints, for `/config_dump`.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        self.services
            .values()
            .map(|(vips, s)| {
                let ports: Vec<_> = s
                    .ports
                    .iter()
                    .map(|p| {
                        let endpoints: Vec<_> = p
                            .endpoints
                            .iter()
                            .map(|e| {
                                serde_json::json!({
                                    "address": e.addr.to_string(),
                                    "readiness": format!("{:?}", e.readiness).to_lowercase(),
                                    "local": e.local,
                                    "close": e.close,
                                })
                            })
                            .collect();
                        serde_json::json!({"port": p.port, "endpoints": endpoints})
                    })
                    .collect();
                serde_json::json!({
                    "namespace": s.name.namespace,
                    "name": s.name.name,
                    "hostname": s.name.hostname,
                    "vips": vips,
                    "ports": ports,
                    "internalTrafficPolicyLocal": s.node_local,
                    "trafficDistribution": format!("{:?}", s.distribution),
                    "sessionAffinityClientIP": s.client_affinity,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(v: serde_json::Value) -> Option<ServiceRecord> {
        service_record(&serde_json::from_value(v).unwrap()).unwrap()
    }

    fn slice(v: serde_json::Value) -> SliceRecord {
        slice_record(&serde_json::from_value(v).unwrap())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn headless_external_name_and_non_tcp_parts_are_not_indexed() {
        let base = |spec: serde_json::Value| serde_json::json!({"metadata": {"name": "s", "namespace": "d"}, "spec": spec});
        assert_eq!(
            service(base(serde_json::json!({"clusterIP": "None"}))),
            None
        );
        assert_eq!(
            service(base(
                serde_json::json!({"type": "ExternalName", "externalName": "db.example.com"})
            )),
            None
        );
        let s = service(base(serde_json::json!({
            "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00:96::1"],
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "http", "port": 80}],
            "internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose",
            "sessionAffinity": "ClientIP"
        })))
        .unwrap();
        assert_eq!(
            s.vips,
            vec![
                "10.96.0.1".parse::<IpAddr>().unwrap(),
                "fd00:96::1".parse().unwrap()
            ]
        );
        assert_eq!(s.ports, vec![("http".to_string(), 80)]);
        assert!(s.node_local && s.client_affinity);
        assert_eq!(s.distribution, Distribution::PreferSameZone);
        assert!(
            service_record(
                &serde_json::from_value(base(serde_json::json!({"clusterIP": "10.96.0.300"})))
                    .unwrap()
            )
            .is_err()
        );
        let fqdn: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "labels": {SERVICE_NAME_LABEL: "s"}},
            "addressType": "FQDN", "endpoints": [{"addresses": ["db.example.com"]}]
        }))
        .unwrap();
        assert_eq!(slice_record(&fqdn).unwrap(), None);
    }

    #[test]
    fn endpoint_conditions_follow_kubernetes_defaults() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "x", "labels": {SERVICE_NAME_LABEL: "s"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 7100}],
            "endpoints": [
                {"addresses": ["10.1.0.1"]},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.1.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ]
        }));
        let r: Vec<Readiness> = s.endpoints.iter().map(|e| e.readiness).collect();
        assert_eq!(
            r,
            vec![
                Readiness::Ready,
                Readiness::Unready,
                Readiness::Terminating,
                Readiness::Unready
            ]
        );
    }

    #[test]
    fn ports_resolve_by_name_per_slice_and_duplicates_keep_the_better_readiness() {
        let mut services = BTreeMap::new();
        services.insert(
            ("d".to_string(), "s".to_string()),
            Arc::new(
                service(
                    serde_json::json!({"metadata": {"name": "s", "namespace": "d"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "admin", "port": 81, "targetPort": 9000}]}}),
                )
                .unwrap(),
            ),
        );
        let mut slices = BTreeMap::new();
        // Two slices whose pods name the target port "web" differently.
        for (name, port, ip, ready) in [
            ("s-a", 7100, "10.1.0.1", true),
            ("s-b", 7200, "10.1.0.2", true),
            ("s-c", 7200, "10.1.0.2", false),
        ] {
            slices.insert(
                ("d".to_string(), name.to_string()),
                Arc::new(slice(serde_json::json!({
                    "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: "s"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": port}, {"name": "admin", "port": 9000}],
                    "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                                   "nodeName": "n1"}]
                }))),
            );
        }
        let loc = ServiceSettings {
            node: Some("n1".into()),
            ..ServiceSettings::default()
        };
        let index = Index::build(&services, &slices, &loc);
        let svc = index.by_vip.get(&"10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(svc.name.hostname, "s.d.svc.cluster.local");
        let http: Vec<(SocketAddr, Readiness, bool)> = svc.ports[0]
            .endpoints
            .iter()
            .map(|e| (e.addr, e.readiness, e.local))
            .collect();
        assert_eq!(
            http,
            vec![
                ("10.1.0.1:7100".parse().unwrap(), Readiness::Ready, true),
                ("10.1.0.2:7200".parse().unwrap(), Readiness::Ready, true),
            ]
        );
        assert_eq!(svc.ports[1].port, 81);
        assert_eq!(svc.ports[1].endpoints.len(), 2);
        assert_eq!(
            index
                .by_endpoint
                .get(&"10.1.0.2:9000".parse().unwrap())
                .map(|n| n.name.as_str()),
            Some("s")
        );
        assert_eq!(index.counts(), (1, 4));
    }
}
