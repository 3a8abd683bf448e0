//! The workload store: Kubernetes objects (Pods, Namespaces, policies, Services and their
//! EndpointSlices) from every source the agent has — a directory of manifests, the API
//! server — plus the pods this node's CNI plugin handed over. The data path asks it who owns
//! an address, which Service a VIP is, and which identity a local pod has.
//!
//! Pods and Namespaces are kept as the API's own types (k8s-openapi); Services and
//! EndpointSlices as the compact records of [`crate::services`], converted at their source.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use ambit_common::enrollment::{self, Enrollment, REDIRECTION_ANNOTATION};
use ambit_common::protocol::PodInfo;
use ambit_proxy::authz::{self, Connection, Decision, PeerAuthentication, Policy};
use ambit_proxy::identity::Identity;
use ambit_proxy::mesh::{Directory, Workload};
use ambit_proxy::service::{Service, ServiceName};
use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::policy::Status;
use crate::services::{Index, ServiceRecord, ServiceSettings, SliceRecord};

/// Objects of one source.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// Compiled AuthorizationPolicies (rejected ones in their fail-closed form).
    pub policies: Vec<Arc<Policy>>,
    pub peer_auths: Vec<PeerAuthentication>,
    /// How each policy object was taken (for logs and the admin view).
    pub statuses: Vec<Status>,
    /// Services with a VIP, keyed by (namespace, name).
    pub services: BTreeMap<(String, String), Arc<ServiceRecord>>,
    /// EndpointSlices of Services, keyed by (namespace, slice name).
    pub endpoint_slices: BTreeMap<(String, String), Arc<SliceRecord>>,
}

/// Where objects come from. Each source replaces its own snapshot; lookups see the union.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Manifests,
    Kubernetes,
}

#[derive(Default)]
struct Inner {
    sources: BTreeMap<Source, Objects>,
    /// Sources the agent runs but that have not delivered their first snapshot: until they
    /// do, policy is unknown and inbound connections are refused.
    pending: HashSet<Source>,
    /// The union of all sources (what every lookup reads).
    merged: Objects,
    /// Pods captured on this node, by container id.
    local: HashMap<String, PodInfo>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// The Pod object declaring each address (before local pods override `by_ip`): a local pod
    /// whose runtime name differs from its object's name is still found by its address.
    objects_by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Services by VIP, built from `merged` whenever its Services or EndpointSlices change.
    services: Index,
}

pub struct Store {
    trust_domain: String,
    services: ServiceSettings,
    /// Serve inbound connections to a local pod that no workload source knows (its labels and
    /// service account unchecked). Off: such connections are refused.
    allow_unknown_pods: std::sync::atomic::AtomicBool,
    inner: RwLock<Inner>,
    policy_version: tokio::sync::watch::Sender<u64>,
    objects_version: tokio::sync::watch::Sender<u64>,
    local_version: tokio::sync::watch::Sender<u64>,
}

/// The union of several sources: a Pod or Namespace known to both comes from the later one.
fn merge<'a>(sources: impl Iterator<Item = &'a Objects>) -> Objects {
    let mut out = Objects::default();
    for o in sources {
        out.pods
            .extend(o.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.namespaces
            .extend(o.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.policies.extend(o.policies.iter().cloned());
        out.peer_auths.extend(o.peer_auths.iter().cloned());
        out.statuses.extend(o.statuses.iter().cloned());
        out.services
            .extend(o.services.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.endpoint_slices.extend(
            o.endpoint_slices
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    out
}

/// Labels decide which selector policies apply: a label change is a policy change.
fn labels_changed(a: &Objects, b: &Objects) -> bool {
    let labels = |o: &Objects| -> Vec<(String, String, BTreeMap<String, String>)> {
        o.pods
            .iter()
            .map(|((ns, n), p)| {
                (
                    ns.clone(),
                    n.clone(),
                    p.metadata.labels.clone().unwrap_or_default(),
                )
            })
            .collect()
    };
    labels(a) != labels(b)
}

fn app_label(pod: Option<&Pod>) -> Option<String> {
    pod?.metadata.labels.as_ref()?.get("app").cloned()
}

fn service_account(pod: Option<&Pod>) -> &str {
    pod.and_then(|p| p.spec.as_ref())
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// Addresses of a running pod (none for host-network or finished pods: their IPs are not
/// theirs, or no longer).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Vec::new();
    }
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

impl Store {
    pub fn new(trust_domain: &str) -> Arc<Self> {
        Self::with_services(trust_domain, ServiceSettings::default())
    }

    /// A store that knows where its node is (Service endpoints on this node or in its zone)
    /// and the cluster's Service ranges.
    pub fn with_services(trust_domain: &str, services: ServiceSettings) -> Arc<Self> {
        Arc::new(Self {
            trust_domain: trust_domain.into(),
            services,
            allow_unknown_pods: std::sync::atomic::AtomicBool::new(false),
            inner: RwLock::new(Inner::default()),
            policy_version: tokio::sync::watch::Sender::new(0),
            objects_version: tokio::sync::watch::Sender::new(0),
            local_version: tokio::sync::watch::Sender::new(0),
        })
    }

    /// `--allow-unknown-pods`: serve local pods no source knows, as if they had no labels.
    pub fn allow_unknown_pods(&self, allow: bool) {
        self.allow_unknown_pods
            .store(allow, std::sync::atomic::Ordering::Relaxed);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn identity(&self, namespace: &str, pod: Option<&Pod>) -> Identity {
        Identity::new(&self.trust_domain, namespace, service_account(pod))
    }

    /// Replaces everything the manifests directory said.
    pub fn set_manifests(&self, objects: Objects) {
        self.set_source(Source::Manifests, objects);
    }

    /// Declares a source that will deliver objects later: until it does, [`Store::synced`] is
    /// false and inbound connections are refused (policy unknown = deny).
    pub fn expect(&self, source: Source) {
        let mut inner = self.write();
        if !inner.sources.contains_key(&source) {
            inner.pending.insert(source);
        }
    }

    /// Have all expected sources delivered a first snapshot?
    pub fn synced(&self) -> bool {
        self.read().pending.is_empty()
    }

    /// Sources still awaited (for readiness).
    pub fn pending_sources(&self) -> Vec<Source> {
        let mut v: Vec<_> = self.read().pending.iter().copied().collect();
        v.sort();
        v
    }

    /// Replaces everything one source said.
    pub fn set_source(&self, source: Source, objects: Objects) {
        let mut inner = self.write();
        inner.pending.remove(&source);
        inner.sources.insert(source, objects);
        let merged = merge(inner.sources.values());
        let policies_changed = inner.merged.policies != merged.policies
            || inner.merged.peer_auths != merged.peer_auths
            || labels_changed(&inner.merged, &merged);
        let services_changed = inner.merged.services != merged.services
            || inner.merged.endpoint_slices != merged.endpoint_slices;
        inner.merged = merged;
        if services_changed {
            inner.services = Index::build(
                &inner.merged.services,
                &inner.merged.endpoint_slices,
                &self.services,
            );
        }
        self.reindex(&mut inner);
        drop(inner);
        self.objects_version.send_modify(|v| *v += 1);
        if policies_changed {
            self.policy_version.send_modify(|v| *v += 1);
        }
    }

    /// Bumped on every snapshot from any source.
    pub fn object_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.objects_version.subscribe()
    }

    /// Bumped whenever this node captures or releases a pod.
    pub fn local_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local_version.subscribe()
    }

    /// Should the pod `namespace/name` (with `uid`, if the runtime gave one) be captured,
    /// by its labels and its namespace's? `Undecided` while no source knows that pod.
    pub fn enrollment(&self, namespace: &str, name: &str, uid: &str) -> Enrollment {
        let inner = self.read();
        let Some(pod) = inner
            .merged
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
        else {
            return Enrollment::Undecided;
        };
        if !uid.is_empty() && pod.metadata.uid.as_deref().is_some_and(|u| u != uid) {
            // An older pod of the same name: the new one is not known yet.
            return Enrollment::Undecided;
        }
        let ns = inner.merged.namespaces.get(namespace);
        enrollment::by_labels(
            pod.metadata.labels.as_ref(),
            ns.and_then(|n| n.metadata.labels.as_ref()),
        )
    }

    /// Does any source provide Pod objects (so [`Store::enrollment`] can ever answer)?
    pub fn has_sources(&self) -> bool {
        let inner = self.read();
        !inner.sources.is_empty() || !inner.pending.is_empty()
    }

    /// (namespace, name, uid) of every pod this node captured.
    pub fn local_pods(&self) -> Vec<(String, String, String)> {
        self.read()
            .local
            .values()
            .map(|p| (p.namespace.clone(), p.name.clone(), p.uid.clone()))
            .collect()
    }

    /// The Pod object `namespace/name`, if a source knows it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.read()
            .merged
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// How every policy object was taken.
    pub fn policy_statuses(&self) -> Vec<Status> {
        self.read().merged.statuses.clone()
    }

    /// A pod this node captured (CNI ADD or re-adoption).
    pub fn pod_added(&self, pod: &PodInfo) {
        let mut inner = self.write();
        inner.local.insert(pod.container_id.clone(), pod.clone());
        self.reindex(&mut inner);
        drop(inner);
        self.local_version.send_modify(|v| *v += 1);
    }

    pub fn pod_removed(&self, container_id: &str) {
        let mut inner = self.write();
        if inner.local.remove(container_id).is_some() {
            self.reindex(&mut inner);
            drop(inner);
            self.local_version.send_modify(|v| *v += 1);
        }
    }

    /// Identities of the pods captured on this node (the certificates worth keeping).
    pub fn local_identities(&self) -> HashSet<Identity> {
        let inner = self.read();
        inner
            .local
            .values()
            .map(|p| {
                let obj = inner
                    .merged
                    .pods
                    .get(&(p.namespace.clone(), p.name.clone()));
                self.identity(&p.namespace, obj)
            })
            .collect()
    }

    /// The identity of a pod this node captured.
    pub fn identity_of_pod(&self, pod: &PodInfo) -> Identity {
        self.identity_of(&pod.namespace, &pod.name)
    }

    /// (pods, namespaces) known from all sources.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.merged.pods.len(), inner.merged.namespaces.len())
    }

    /// (Services with a VIP, their endpoints over all ports).
    pub fn service_counts(&self) -> (usize, usize) {
        self.read().services.counts()
    }

    /// Services and endpoints known, for the admin view.
    pub fn services_dump(&self) -> Vec<serde_json::Value> {
        self.read().services.dump()
    }

    fn reindex(&self, inner: &mut Inner) {
        let mut by_ip = HashMap::new();
        for ((ns, name), pod) in &inner.merged.pods {
            let hbone = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .is_some_and(|v| v == "enabled");
            let w = Arc::new(Workload {
                name: name.clone(),
                namespace: ns.clone(),
                identity: self.identity(ns, Some(pod)),
                hbone,
                app: app_label(Some(pod)),
            });
            for ip in pod_ips(pod) {
                by_ip.insert(ip, w.clone());
            }
        }
        let objects_by_ip = by_ip.clone();
        // What this node captured is authoritative for its own addresses.
        for p in inner.local.values() {
            let obj = inner
                .merged
                .pods
                .get(&(p.namespace.clone(), p.name.clone()));
            let w = Arc::new(Workload {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                identity: self.identity(&p.namespace, obj),
                hbone: true,
                app: app_label(obj),
            });
            for ip in &p.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        inner.by_ip = by_ip;
        inner.objects_by_ip = objects_by_ip;
    }
}

impl Directory for Store {
    fn by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.read().by_ip.get(&ip.to_canonical()).cloned()
    }

    fn service(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.read().services.by_vip.get(&ip.to_canonical()).cloned()
    }

    fn in_service_range(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.services.service_cidrs.iter().any(|n| n.contains(&ip))
    }

    fn service_of_endpoint(&self, addr: SocketAddr) -> Option<Arc<ServiceName>> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.read().services.by_endpoint.get(&addr).cloned()
    }

    fn identity_of(&self, namespace: &str, name: &str) -> Identity {
        let inner = self.read();
        let obj = inner
            .merged
            .pods
            .get(&(namespace.to_owned(), name.to_owned()));
        self.identity(namespace, obj)
    }

    fn authorize(&self, namespace: &str, name: &str, conn: &Connection) -> Decision {
        let inner = self.read();
        if !inner.pending.is_empty() {
            return Decision::Deny(format!(
                "policies not loaded yet (waiting for {:?}): refused until they are",
                inner.pending
            ));
        }
        // By name, else by the address the connection is for (same namespace): a runtime may
        // name the pod differently from its object (a hand-built node, podman).
        let pod = inner
            .merged
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .or_else(|| {
                let w = inner
                    .objects_by_ip
                    .get(&conn.dst_ip)
                    .filter(|w| w.namespace == namespace)?;
                inner
                    .merged
                    .pods
                    .get(&(w.namespace.clone(), w.name.clone()))
            });
        // Where pods are declared (the Kubernetes source, or Pod objects in the manifests) or
        // a policy selects workloads by labels, a pod the source does not know has unknown
        // labels and service account: which policies select it cannot be told. Where nothing
        // declares pods and nothing selects by labels (a standalone agent, a manifests
        // directory of Services only), there is nothing its labels could change.
        let declares = |s: &Source| *s == Source::Kubernetes;
        let selects = |scope: &authz::Scope| matches!(scope, authz::Scope::Selector { .. });
        let knowable = inner.sources.keys().any(declares)
            || inner.pending.iter().any(declares)
            || !inner.merged.pods.is_empty()
            || inner.merged.policies.iter().any(|p| selects(&p.scope))
            || inner.merged.peer_auths.iter().any(|p| selects(&p.scope));
        if pod.is_none()
            && knowable
            && !self
                .allow_unknown_pods
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Decision::Deny(format!(
                "pod {namespace}/{name} is unknown to the workload source ({:?}): its labels and service account cannot be checked (--allow-unknown-pods serves it anyway)",
                inner.sources.keys().collect::<Vec<_>>()
            ));
        }
        let labels = pod
            .and_then(|p| p.metadata.labels.clone())
            .unwrap_or_default();
        authz::evaluate(
            &inner.merged.policies,
            &inner.merged.peer_auths,
            namespace,
            &labels,
            conn,
        )
    }

    fn policy_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.policy_version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, sa: Option<&str>, ip: &str, captured: bool) -> Pod {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        });
        if let Some(sa) = sa {
            v["spec"]["serviceAccountName"] = sa.into();
        }
        if captured {
            v["metadata"]["annotations"] = serde_json::json!({REDIRECTION_ANNOTATION: "enabled"});
        }
        serde_json::from_value(v).unwrap()
    }

    fn objects(pods: Vec<Pod>) -> Objects {
        let mut o = Objects::default();
        for p in pods {
            let key = (
                p.metadata.namespace.clone().unwrap(),
                p.metadata.name.clone().unwrap(),
            );
            o.pods.insert(key, p);
        }
        o
    }

    fn local(name: &str, ip: &str) -> PodInfo {
        PodInfo {
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            namespace: "default".into(),
            name: name.into(),
            uid: String::new(),
            ips: vec![ip.parse().unwrap()],
            annotations: Default::default(),
            netns_path: "/proc/self/ns/net".into(),
            rules: None,
        }
    }

    #[test]
    fn a_pod_the_source_does_not_know_is_refused_unless_the_operator_allows_it() {
        let conn = Connection {
            src_identity: None,
            src_ip: "10.0.0.9".parse().unwrap(),
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: 9080,
        };
        let s = Store::new("td");
        // No source at all (standalone): no Pod objects, nothing to check against.
        assert_eq!(s.authorize("default", "ratings", &conn), Decision::Allow);
        // A source that declares no pods and selects nothing by labels (Services only):
        // nothing the pod's labels could change.
        s.set_manifests(Objects::default());
        assert_eq!(s.authorize("default", "ratings", &conn), Decision::Allow);
        s.set_manifests(objects(vec![pod(
            "default", "known", None, "10.0.0.3", true,
        )]));
        assert!(
            matches!(s.authorize("default", "ratings", &conn), Decision::Deny(why) if why.contains("unknown to the workload source")),
        );
        assert_eq!(s.authorize("default", "known", &conn), Decision::Allow);
        // Known by its address: the runtime named it "ratings", its object is "ratings-v1".
        s.set_manifests(objects(vec![
            pod("default", "known", None, "10.0.0.3", true),
            pod("default", "ratings-v1", None, "10.0.0.2", true),
        ]));
        assert_eq!(s.authorize("default", "ratings", &conn), Decision::Allow);
        // ...in its own namespace only.
        assert!(matches!(
            s.authorize("other", "ratings", &conn),
            Decision::Deny(_)
        ));
        s.allow_unknown_pods(true);
        assert_eq!(s.authorize("other", "ratings", &conn), Decision::Allow);
    }

    #[test]
    fn identities_come_from_the_pod_object_or_default() {
        let s = Store::new("cluster1");
        s.pod_added(&local("ratings", "10.0.0.2"));
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            s.by_ip(ip).unwrap().identity.to_string(),
            "spiffe://cluster1/ns/default/sa/default",
            "unknown Pod object: service account default"
        );
        s.set_manifests(objects(vec![pod(
            "default",
            "ratings",
            Some("bookinfo-ratings"),
            "10.0.0.2",
            false,
        )]));
        let w = s.by_ip(ip).unwrap();
        assert_eq!(
            w.identity.principal(),
            "cluster1/ns/default/sa/bookinfo-ratings"
        );
        assert!(w.hbone, "a pod this node captured serves HBONE");
        assert_eq!(s.identity_of("default", "ratings"), w.identity);
        assert_eq!(s.local_identities().len(), 1);
        s.pod_removed("c-ratings");
        assert!(
            !s.by_ip(ip).unwrap().hbone,
            "known from manifests only, not annotated"
        );
    }

    #[test]
    fn remote_pods_need_the_redirection_annotation_and_an_address() {
        let s = Store::new("td");
        let mut host = pod("kube-system", "proxy", None, "192.168.0.1", true);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut done = pod("default", "job", None, "10.1.0.9", true);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        s.set_manifests(objects(vec![
            pod("default", "a", None, "10.1.0.2", true),
            pod("default", "b", None, "fd00::2", false),
            host,
            done,
        ]));
        assert!(s.by_ip("10.1.0.2".parse().unwrap()).unwrap().hbone);
        assert!(!s.by_ip("fd00::2".parse().unwrap()).unwrap().hbone);
        assert!(s.by_ip("192.168.0.1".parse().unwrap()).is_none());
        assert!(s.by_ip("10.1.0.9".parse().unwrap()).is_none());
        assert!(
            s.by_ip("::ffff:10.1.0.2".parse().unwrap()).is_some(),
            "v4-mapped addresses are found too"
        );
    }
}
