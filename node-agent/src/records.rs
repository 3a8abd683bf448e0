//! Compact records of the Kubernetes objects the workload store keeps about pods and
//! namespaces: only what the agent reads, with repeated strings (namespaces, service
//! accounts) and label sets shared.
//!
//! A cluster's Pod objects are most of what an agent holds: every agent knows every pod (a
//! remote pod decides HBONE or plaintext, and whose identity to expect). A whole `Pod` of
//! k8s-openapi, even with its containers dropped, costs kilobytes; the record costs a few
//! hundred bytes, and the pods of one ReplicaSet share one label set. Sources convert each
//! object as it arrives and keep nothing else of it.
//!
//! Sharing is by hand (a set of `Arc`s swept of unused entries) rather than an interning crate:
//! the sets are tiny, sweeping must follow the store's own removals, and the two candidates
//! looked at intern for the process's lifetime (never freeing), which a long-running agent
//! watching pods come and go cannot afford.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use ambit_common::enrollment::REDIRECTION_ANNOTATION;
use k8s_openapi::api::core::v1::{Namespace, Pod};

/// What converting objects depends on, for every source alike.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// The namespace whose selector-less policies apply mesh-wide.
    pub root_namespace: String,
    /// This agent's node (`--node-name`): a pod scheduled on another keeps no labels.
    pub node: Option<String>,
}

/// A pod's or namespace's labels.
pub type Labels = BTreeMap<String, String>;

/// What the agent keeps of one Pod object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// `metadata.uid` (empty when the object has none, as in hand-written manifests).
    pub uid: Box<str>,
    /// `spec.serviceAccountName`; `default` when unset.
    pub service_account: Arc<str>,
    /// The pod's own addresses while it runs; none for host-network or finished pods.
    pub ips: Box<[IpAddr]>,
    /// `spec.nodeName`, once scheduled.
    pub node: Option<Arc<str>>,
    /// The pod's labels; `None` for a pod scheduled on another node than this agent's:
    /// labels are read for enrollment and by policy selectors, both decided on the pod's own
    /// node, so a remote pod's would only cost memory.
    pub labels: Option<Arc<Labels>>,
    /// The `app` label (metrics), kept for every pod.
    pub app: Option<Arc<str>>,
    /// Carries `ambit.dev/redirection: enabled`: captured by an agent, serves HBONE.
    pub hbone: bool,
}

impl PodRecord {
    /// The `app` label (metrics).
    pub fn app(&self) -> Option<&str> {
        self.app.as_deref()
    }
}

/// (namespace, name) of an object; `default` when the namespace is absent.
pub fn key_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<(String, String)> {
    let name = meta.name.clone()?;
    Some((
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
    ))
}

/// The record of a Pod object; `None` without a name. `this_node` is the agent's node name:
/// a pod scheduled on another node keeps no labels (unknown, every pod keeps them).
pub fn pod_record(pod: &Pod, this_node: Option<&str>) -> Option<PodRecord> {
    let meta = &pod.metadata;
    let (namespace, name) = key_of(meta)?;
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let hbone = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .is_some_and(|v| v == "enabled");
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let labels = meta.labels.as_ref();
    let here = match (node, this_node) {
        (Some(node), Some(this)) => node == this,
        _ => true,
    };
    Some(PodRecord {
        namespace: shared_str(&namespace),
        name: name.into(),
        uid: meta.uid.as_deref().unwrap_or_default().into(),
        service_account: shared_str(service_account),
        ips: pod_ips(pod).into(),
        node: node.map(shared_str),
        labels: here.then(|| shared_labels(labels.cloned().unwrap_or_default())),
        app: labels.and_then(|l| l.get("app")).map(|a| shared_str(a)),
        hbone,
    })
}

/// The labels of a Namespace object, with its name; `None` without a name.
pub fn namespace_record(ns: &Namespace) -> Option<(String, Arc<Labels>)> {
    let name = ns.metadata.name.clone()?;
    Some((
        name,
        shared_labels(ns.metadata.labels.clone().unwrap_or_default()),
    ))
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
        .filter_map(|p| p.ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .pod_ip
            .as_deref()
            .and_then(|s| s.parse::<IpAddr>().ok())
    {
        ips.push(ip.to_canonical());
    }
    ips
}

/// A set of shared values: `get` returns the one already held, if equal.
struct Shared<T: ?Sized> {
    set: HashSet<Arc<T>>,
    /// Size after the last sweep: the next sweep runs when the set has doubled since, so
    /// sweeping costs O(1) per insertion over time.
    swept_at: usize,
}

impl<T: ?Sized + Hash + Eq> Shared<T> {
    fn new() -> Self {
        Self {
            set: HashSet::new(),
            swept_at: 64,
        }
    }

    fn get(&mut self, value: &T) -> Option<Arc<T>> {
        self.set.get(value).cloned()
    }

    fn insert(&mut self, value: Arc<T>) -> Arc<T> {
        if self.set.len() >= 2 * self.swept_at {
            // Held only here: nothing uses it any more.
            self.set.retain(|v| Arc::strong_count(v) > 1);
            self.swept_at = self.set.len().max(64);
        }
        self.set.insert(value.clone());
        value
    }
}

fn strings() -> &'static Mutex<Shared<str>> {
    static S: OnceLock<Mutex<Shared<str>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Shared::new()))
}

fn label_sets() -> &'static Mutex<Shared<Labels>> {
    static S: OnceLock<Mutex<Shared<Labels>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Shared::new()))
}

/// The shared copy of a string that many records repeat (a namespace, a service account).
pub fn shared_str(s: &str) -> Arc<str> {
    let mut set = strings().lock().unwrap_or_else(|p| p.into_inner());
    match set.get(s) {
        Some(a) => a,
        None => set.insert(Arc::from(s)),
    }
}

/// The shared copy of a label set (the pods of one ReplicaSet have the same labels).
pub fn shared_labels(labels: Labels) -> Arc<Labels> {
    let mut set = label_sets().lock().unwrap_or_else(|p| p.into_inner());
    match set.get(&labels) {
        Some(a) => a,
        None => set.insert(Arc::new(labels)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_record_keeps_what_the_agent_reads_and_shares_repeated_parts() {
        let p = |name: &str, ip: &str| {
            pod(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}"),
                    "labels": {"app": "web", "pod-template-hash": "abc"},
                    "annotations": {REDIRECTION_ANNOTATION: "enabled", "other": "x"}},
                "spec": {"serviceAccountName": "web-sa", "nodeName": "node-a", "containers": []},
                "status": {"phase": "Running", "podIPs": [{"ip": ip}, {"ip": "fd00::1"}]},
            }))
        };
        let a = pod_record(&p("web-1", "10.0.0.1"), Some("node-a")).unwrap();
        let b = pod_record(&p("web-2", "10.0.0.2"), Some("node-a")).unwrap();
        assert_eq!(&*a.namespace, "shop");
        assert_eq!(&*a.name, "web-1");
        assert_eq!(&*a.uid, "u-web-1");
        assert_eq!(&*a.service_account, "web-sa");
        assert_eq!(
            &*a.ips,
            &[
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert!(a.hbone);
        assert_eq!(a.app(), Some("web"));
        assert_eq!(a.node.as_deref(), Some("node-a"));
        assert_eq!(a.labels.as_ref().unwrap()["pod-template-hash"], "abc");
        assert!(
            Arc::ptr_eq(a.labels.as_ref().unwrap(), b.labels.as_ref().unwrap()),
            "one label set for the ReplicaSet"
        );
        // Seen from another node: no labels but the app's, shared.
        let remote = pod_record(&p("web-3", "10.0.0.3"), Some("node-b")).unwrap();
        assert!(remote.labels.is_none());
        assert_eq!(remote.app(), Some("web"));
        assert!(Arc::ptr_eq(
            remote.app.as_ref().unwrap(),
            a.app.as_ref().unwrap()
        ));
        // The agent's node unknown (a hand-built node): labels kept.
        assert!(
            pod_record(&p("web-4", "10.0.0.4"), None)
                .unwrap()
                .labels
                .is_some()
        );
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert!(Arc::ptr_eq(&a.service_account, &b.service_account));
    }

    #[test]
    fn finished_and_host_network_pods_have_no_address_and_defaults_fill_the_rest() {
        let finished = pod(serde_json::json!({
            "metadata": {"name": "job"},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.3"},
        }));
        let r = pod_record(&finished, None).unwrap();
        assert!(r.ips.is_empty());
        assert_eq!(&*r.namespace, "default");
        assert_eq!(&*r.service_account, "default");
        assert!(!r.hbone);
        let host = pod(serde_json::json!({
            "metadata": {"name": "h"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIP": "192.168.1.5"},
        }));
        assert!(pod_record(&host, None).unwrap().ips.is_empty());
        let single = pod(serde_json::json!({
            "metadata": {"name": "s"},
            "status": {"phase": "Pending", "podIP": "::ffff:10.0.0.4"},
        }));
        assert_eq!(
            &*pod_record(&single, None).unwrap().ips,
            &["10.0.0.4".parse::<IpAddr>().unwrap()]
        );
        assert!(pod_record(&pod(serde_json::json!({"metadata": {}})), None).is_none());
    }

    #[test]
    fn unused_shared_values_are_swept() {
        let mut s: Shared<str> = Shared::new();
        let keep = s.insert(Arc::from("keep"));
        for i in 0..1000 {
            let v = format!("gone-{i}");
            if s.get(&v).is_none() {
                s.insert(Arc::from(v.as_str()));
            }
        }
        assert!(s.set.len() < 300, "{} held", s.set.len());
        assert!(Arc::ptr_eq(&s.get("keep").unwrap(), &keep));
    }
}
