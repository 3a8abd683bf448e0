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

use crate::claims::{Claims, Owned};

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

impl Owned for Service {
    fn owner(&self) -> (&str, &str) {
        (&self.name.namespace, &self.name.name)
    }
}

impl Owned for ServiceName {
    fn owner(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

/// Services by VIP, and endpoints back to a Service (telemetry), derived from records one
/// Service at a time: a change to a Service or to one of its slices re-derives that Service
/// only.
#[derive(Debug)]
pub struct Index {
    by_vip: Claims<IpAddr, Service>,
    by_endpoint: Claims<SocketAddr, ServiceName>,
    /// (namespace, name) → the Service, for the admin view.
    pub services: BTreeMap<(String, String), (Vec<IpAddr>, Arc<Service>)>,
    /// (namespace, Service) → the keys of its slices.
    slices_of: HashMap<Key, std::collections::BTreeSet<Key>>,
    /// This node's zone as its local endpoints say it (when not configured).
    zone: Option<String>,
}

impl Default for Index {
    fn default() -> Self {
        Self {
            // As a full build always did: the last Service by name keeps a shared VIP, the
            // first names a shared endpoint.
            by_vip: Claims::new(true),
            by_endpoint: Claims::new(false),
            services: BTreeMap::new(),
            slices_of: HashMap::new(),
            zone: None,
        }
    }
}

type Key = (String, String);

/// Keys whose value differs between two maps (added, removed or changed; `Arc`s that are the
/// same allocation are not compared further).
fn differing<'a, V: PartialEq>(
    old: &'a BTreeMap<Key, Arc<V>>,
    new: &'a BTreeMap<Key, Arc<V>>,
) -> Vec<&'a Key> {
    let mut out: Vec<&Key> = new
        .iter()
        .filter(|(k, v)| {
            old.get(*k)
                .is_none_or(|o| !Arc::ptr_eq(o, v) && **o != ***v)
        })
        .map(|(k, _)| k)
        .collect();
    out.extend(old.keys().filter(|k| !new.contains_key(*k)));
    out
}

impl Index {
    /// The index of `services` and their `slices`.
    pub fn build(
        services: &BTreeMap<Key, Arc<ServiceRecord>>,
        slices: &BTreeMap<Key, Arc<SliceRecord>>,
        loc: &ServiceSettings,
    ) -> Self {
        let mut index = Index::default();
        index.update(&BTreeMap::new(), &BTreeMap::new(), services, slices, loc);
        index
    }

    /// Follows the records from `old_*` to `new_*`: only the Services whose record or slices
    /// differ are derived again (all of them if this node's inferred zone changed).
    pub fn update(
        &mut self,
        old_services: &BTreeMap<Key, Arc<ServiceRecord>>,
        old_slices: &BTreeMap<Key, Arc<SliceRecord>>,
        services: &BTreeMap<Key, Arc<ServiceRecord>>,
        slices: &BTreeMap<Key, Arc<SliceRecord>>,
        loc: &ServiceSettings,
    ) {
        let changed_services = differing(old_services, services).into_iter().cloned();
        let changed_slices = differing(old_slices, slices)
            .into_iter()
            .map(|k| (k.clone(), old_slices.get(k).cloned()));
        self.apply(changed_services, changed_slices, services, slices, loc);
    }

    /// Follows changes to the records: `services` and `slices` are the records now,
    /// `changed_services` the Services whose record changed, `changed_slices` the slices that
    /// changed, each with its record before. Only the Services concerned are derived again
    /// (all of them if this node's inferred zone changed).
    pub fn apply(
        &mut self,
        changed_services: impl IntoIterator<Item = Key>,
        changed_slices: impl IntoIterator<Item = (Key, Option<Arc<SliceRecord>>)>,
        services: &BTreeMap<Key, Arc<ServiceRecord>>,
        slices: &BTreeMap<Key, Arc<SliceRecord>>,
        loc: &ServiceSettings,
    ) {
        let mut changed: std::collections::BTreeSet<Key> = changed_services.into_iter().collect();
        let on_this_node =
            |s: &SliceRecord| loc.node.is_some() && s.endpoints.iter().any(|e| e.node == loc.node);
        let mut zone_may_change = false;
        for (key, before) in changed_slices {
            let (ns, _) = &key;
            let now = slices.get(&key);
            for rec in [before.as_ref(), now].into_iter().flatten() {
                zone_may_change |= on_this_node(rec);
                let owner = (ns.clone(), rec.service.clone());
                if let Some(set) = self.slices_of.get_mut(&owner) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.slices_of.remove(&owner);
                    }
                }
                changed.insert(owner);
            }
            if let Some(rec) = now {
                self.slices_of
                    .entry((ns.clone(), rec.service.clone()))
                    .or_default()
                    .insert(key.clone());
            }
        }
        // Learned from this node's endpoints: only a slice that has (or had) one can change it.
        if zone_may_change && loc.zone.is_none() {
            let zone = slices
                .values()
                .flat_map(|s| &s.endpoints)
                .find(|e| e.node == loc.node && e.zone.is_some())
                .and_then(|e| e.zone.clone());
            if zone != self.zone {
                self.zone = zone;
                changed.extend(services.keys().cloned());
            }
        }
        for key in changed {
            self.derive(&key, services.get(&key), slices, loc);
        }
    }

    /// Removes what Service `key` had in the index and derives it again from `record`.
    fn derive(
        &mut self,
        key: &Key,
        record: Option<&Arc<ServiceRecord>>,
        slices: &BTreeMap<Key, Arc<SliceRecord>>,
        loc: &ServiceSettings,
    ) {
        let (ns, name) = key;
        let owner = (ns.as_str(), name.as_str());
        if let Some((vips, old)) = self.services.remove(key) {
            for vip in &vips {
                self.by_vip.release(vip, owner);
            }
            for e in old.ports.iter().flat_map(|p| &p.endpoints) {
                self.by_endpoint.release(&e.addr, owner);
            }
        }
        let Some(svc) = record else { return };
        let local = |e: &EndpointRecord| loc.node.is_some() && e.node == loc.node;
        let zone = loc.zone.as_ref().or(self.zone.as_ref());
        let close = |e: &EndpointRecord| match svc.distribution {
            Distribution::Any => false,
            Distribution::PreferSameNode => local(e),
            Distribution::PreferSameZone => match (&e.hint_zones, zone) {
                (Some(hints), Some(z)) => hints.contains(z),
                (None, Some(z)) => e.zone.as_ref() == Some(z),
                (_, None) => false,
            },
        };
        let sname = Arc::new(ServiceName {
            name: name.as_str().into(),
            namespace: ns.as_str().into(),
            hostname: format!("{name}.{ns}.svc.{}", loc.cluster_domain).into(),
        });
        let of_service: Vec<&SliceRecord> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| slices.get(k).map(|s| &**s))
            .collect();
        let mut ports = Vec::with_capacity(svc.ports.len());
        for (port_name, port) in &svc.ports {
            // One entry per address: an endpoint moving between slices is listed twice
            // for a moment; the better readiness wins.
            let mut endpoints: Vec<Endpoint> = Vec::new();
            let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
            for s in &of_service {
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
                self.by_endpoint.claim(e.addr, sname.clone());
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
            self.by_vip.claim(*vip, service.clone());
        }
        self.services
            .insert(key.clone(), (svc.vips.clone(), service));
    }

    /// The Service whose VIP is `ip`.
    pub fn vip(&self, ip: &IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(ip)
    }

    /// A Service that has `addr` as an endpoint.
    pub fn endpoint(&self, addr: &SocketAddr) -> Option<&Arc<ServiceName>> {
        self.by_endpoint.get(addr)
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
                    "namespace": &*s.name.namespace,
                    "name": &*s.name.name,
                    "hostname": &*s.name.hostname,
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
        let svc = index.vip(&"10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(&*svc.name.hostname, "s.d.svc.cluster.local");
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
                .endpoint(&"10.1.0.2:9000".parse().unwrap())
                .map(|n| &*n.name),
            Some("s")
        );
        assert_eq!(index.counts(), (1, 4));
    }

    /// Everything the index answers, comparable.
    fn answers(i: &Index, vips: &[IpAddr], eps: &[SocketAddr]) -> String {
        let v: Vec<_> = vips
            .iter()
            .map(|a| {
                i.vip(a)
                    .map(|s| format!("{}/{}", s.name.namespace, s.name.name))
            })
            .collect();
        let e: Vec<_> = eps
            .iter()
            .map(|a| i.endpoint(a).map(|n| n.name.clone()))
            .collect();
        format!("{:?}\n{v:?}\n{e:?}\n{:?}", i.dump(), i.counts())
    }

    #[test]
    fn updating_one_service_at_a_time_answers_as_a_full_build_does() {
        // A small world where VIPs and endpoints are shared between Services, slices move
        // between Services and endpoints come and go; after each random change the index
        // that followed the changes answers exactly as one built from scratch.
        let loc = ServiceSettings {
            node: Some("n1".into()),
            ..ServiceSettings::default()
        };
        let vips: Vec<IpAddr> = (1..=4)
            .map(|i| format!("10.96.0.{i}").parse().unwrap())
            .collect();
        let eps: Vec<SocketAddr> = (1..=6)
            .flat_map(|i| [80u16, 8080].map(move |p| format!("10.1.0.{i}:{p}").parse().unwrap()))
            .collect();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut services: BTreeMap<Key, Arc<ServiceRecord>> = BTreeMap::new();
        let mut slices: BTreeMap<Key, Arc<SliceRecord>> = BTreeMap::new();
        let mut index = Index::default();
        for step in 0..400 {
            let (old_services, old_slices) = (services.clone(), slices.clone());
            let name = format!("s{}", rnd(3));
            match rnd(4) {
                0 => {
                    services.remove(&("d".into(), name));
                }
                1 => {
                    let vip = vips[rnd(vips.len())];
                    let dist = ["PreferClose", "PreferSameNode", "Other"][rnd(3)];
                    let svc = service(serde_json::json!({"metadata": {"name": name, "namespace": "d"},
                        "spec": {"clusterIP": vip.to_string(), "trafficDistribution": dist,
                                 "ports": [{"name": "http", "port": 80}, {"name": "alt", "port": 81}]}}))
                    .unwrap();
                    services.insert(("d".into(), name), Arc::new(svc));
                }
                2 => {
                    slices.remove(&("d".into(), format!("sl{}", rnd(4))));
                }
                _ => {
                    let endpoints: Vec<serde_json::Value> = (0..rnd(4))
                        .map(|_| {
                            let i = 1 + rnd(6);
                            serde_json::json!({"addresses": [format!("10.1.0.{i}")],
                                "conditions": {"ready": rnd(2) == 0},
                                "nodeName": format!("n{}", 1 + rnd(2)), "zone": format!("z{}", rnd(2))})
                        })
                        .collect();
                    let target = [80, 8080][rnd(2)];
                    let sl = slice(
                        serde_json::json!({"metadata": {"name": "x", "namespace": "d",
                            "labels": {SERVICE_NAME_LABEL: name}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": target}, {"name": "alt", "port": 8080}],
                        "endpoints": endpoints}),
                    );
                    slices.insert(("d".into(), format!("sl{}", rnd(4))), Arc::new(sl));
                }
            }
            index.update(&old_services, &old_slices, &services, &slices, &loc);
            let fresh = Index::build(&services, &slices, &loc);
            assert_eq!(
                answers(&index, &vips, &eps),
                answers(&fresh, &vips, &eps),
                "step {step}"
            );
        }
    }
}
