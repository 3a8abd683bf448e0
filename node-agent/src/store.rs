//! The workload store: what every source the agent has — a directory of manifests, the API
//! server — says about Pods, Namespaces, policies, Services and their EndpointSlices, plus the
//! pods this node's CNI plugin handed over. The data path asks it who owns an address, which
//! Service a VIP is, and which identity a local pod has.
//!
//! Pods are kept as compact records ([`crate::records`]) and updated one event at a time:
//! a pod added, changed or deleted costs O(1) on the record map and the address index, and
//! the write lock is held for that one change only, so the data path's lookups never wait
//! behind a batch. A batch (a watch's burst, a manifests reload) publishes once: one bump of
//! the version channels. Policies are re-evaluated only when a policy object changes or a pod
//! this node serves changes its labels (authorization is decided at the destination).
//! Everything else (Namespaces' labels, policies, Services) is small and replaced per source.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use ambit_common::enrollment::{self, Enrollment};
use ambit_common::protocol::PodInfo;
use ambit_proxy::authz::{self, Connection, Decision, PeerAuthentication, Policy};
use ambit_proxy::identity::Identity;
use ambit_proxy::mesh::{Directory, Workload};
use ambit_proxy::service::{Service, ServiceName};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::claims::{Claims, Owned};
use crate::policy::Status;
use crate::records::{Labels, PodRecord};
use crate::services::{Index, ServiceRecord, ServiceSettings, SliceRecord};

/// Objects of one source.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(String, String), Arc<PodRecord>>,
    /// Each Namespace's labels, by name.
    pub namespaces: BTreeMap<String, Arc<Labels>>,
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

impl Objects {
    /// Adds everything of `other` (its pods too if `pods`): an object both have under one key
    /// becomes `other`'s; policies and statuses are appended.
    pub fn extend_from(&mut self, other: &Objects, pods: bool) {
        let o = other;
        if pods {
            self.pods
                .extend(o.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self.namespaces
            .extend(o.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.policies.extend(o.policies.iter().cloned());
        self.peer_auths.extend(o.peer_auths.iter().cloned());
        self.statuses.extend(o.statuses.iter().cloned());
        self.services
            .extend(o.services.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.endpoint_slices.extend(
            o.endpoint_slices
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }

    /// Adds a pod record under its own key.
    pub fn add_pod(&mut self, pod: PodRecord) {
        self.pods.insert(
            (pod.namespace.to_string(), pod.name.to_string()),
            Arc::new(pod),
        );
    }
}

/// Where objects come from. Each source replaces its own snapshot (or changes its pods one
/// by one); lookups see the union, the later source winning for a pod or namespace both know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Manifests,
    Kubernetes,
}

impl Source {
    fn layer(self) -> usize {
        match self {
            Source::Manifests => 0,
            Source::Kubernetes => 1,
        }
    }
}

/// (namespace, name) of an object.
pub type Key = (String, String);

/// One change to a source's objects of one kind.
#[derive(Clone, Debug)]
pub enum Change<V> {
    /// Added or changed.
    Upsert(Key, Arc<V>),
    Delete(Key),
}

/// What an update says about a source's objects of one kind.
#[derive(Debug)]
pub enum Keyed<V> {
    /// The source's whole set: what it had before and does not list is deleted.
    Replace(BTreeMap<Key, Arc<V>>),
    /// Changes to what it had (none: nothing changed).
    Changes(Vec<Change<V>>),
}

impl<V> Default for Keyed<V> {
    fn default() -> Self {
        Keyed::Changes(Vec::new())
    }
}

impl<V> Keyed<V> {
    /// The changes to make to a source that now has the keys `had` returns (asked only for
    /// a whole set).
    fn into_changes(self, had: impl FnOnce() -> Vec<Key>) -> Vec<Change<V>> {
        match self {
            Keyed::Changes(c) => c,
            Keyed::Replace(all) => {
                let mut changes: Vec<Change<V>> = had()
                    .into_iter()
                    .filter(|k| !all.contains_key(k))
                    .map(Change::Delete)
                    .collect();
                changes.extend(all.into_iter().map(|(k, v)| Change::Upsert(k, v)));
                changes
            }
        }
    }

    /// How many objects (a whole set) or changes it carries.
    pub fn len(&self) -> usize {
        match self {
            Keyed::Replace(all) => all.len(),
            Keyed::Changes(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one source says now. Applied by [`Store::update`], published once.
#[derive(Debug, Default)]
pub struct Update {
    pub pods: Keyed<PodRecord>,
    pub services: Keyed<ServiceRecord>,
    pub slices: Keyed<SliceRecord>,
    /// Everything else the source has (Namespaces, policies), when that changed; its pods,
    /// Services and EndpointSlices are ignored.
    pub rest: Option<Objects>,
}

/// One kind's records from each source, and the records in force (the later source's).
struct Layered<V> {
    layers: [BTreeMap<Key, Arc<V>>; 2],
    merged: BTreeMap<Key, Arc<V>>,
}

impl<V> Default for Layered<V> {
    fn default() -> Self {
        Self {
            layers: [BTreeMap::new(), BTreeMap::new()],
            merged: BTreeMap::new(),
        }
    }
}

impl<V: PartialEq> Layered<V> {
    fn keys(&self, source: Source) -> Vec<Key> {
        self.layers[source.layer()].keys().cloned().collect()
    }

    /// Applies one change of `source`; if the record in force changed, returns its key and
    /// the record in force before.
    fn apply(&mut self, source: Source, change: Change<V>) -> Option<(Key, Option<Arc<V>>)> {
        let (key, value) = match change {
            Change::Upsert(k, v) => (k, Some(v)),
            Change::Delete(k) => (k, None),
        };
        let layer = &mut self.layers[source.layer()];
        if layer.get(&key) == value.as_ref() {
            return None;
        }
        match value {
            Some(v) => layer.insert(key.clone(), v),
            None => layer.remove(&key),
        };
        let now = self.layers.iter().rev().find_map(|l| l.get(&key)).cloned();
        let before = match &now {
            Some(v) => self.merged.insert(key.clone(), v.clone()),
            None => self.merged.remove(&key),
        };
        (before != now).then_some((key, before))
    }
}

/// A pod's records from each source, and the workload the data path sees for the one in
/// force (the later source's).
struct PodEntry {
    layers: [Option<Arc<PodRecord>>; 2],
    workload: Arc<Workload>,
}

impl PodEntry {
    fn record(&self) -> Option<&Arc<PodRecord>> {
        self.layers[1].as_ref().or(self.layers[0].as_ref())
    }
}

impl Owned for Workload {
    fn owner(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

struct Inner {
    /// Sources that delivered their first snapshot.
    delivered: BTreeSet<Source>,
    /// Sources the agent runs but that have not delivered their first snapshot: until they
    /// do, policy is unknown and inbound connections are refused.
    pending: HashSet<Source>,
    /// Per source, everything but its pods, Services and EndpointSlices.
    rest: BTreeMap<Source, Objects>,
    /// The union of `rest`: what lookups of those kinds read.
    merged: Objects,
    services: Layered<ServiceRecord>,
    slices: Layered<SliceRecord>,
    /// Pods by namespace, then name.
    pods: HashMap<Arc<str>, HashMap<Arc<str>, PodEntry>>,
    pod_count: usize,
    /// The Pod objects claiming each address (with several, the last by namespace and name,
    /// as the store always chose).
    by_ip: Claims<IpAddr, Workload>,
    /// Pods captured on this node, by container id.
    local: HashMap<String, PodInfo>,
    /// (namespace, name) of the local pods, with how many captures carry it.
    local_keys: HashMap<(String, String), usize>,
    /// What this node captured is authoritative for its own addresses (over `by_ip`).
    local_by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Services by VIP, following the Services and EndpointSlices in force one change at a
    /// time.
    index: Index,
}

impl Inner {
    fn record(&self, namespace: &str, name: &str) -> Option<&Arc<PodRecord>> {
        self.pods.get(namespace)?.get(name)?.record()
    }
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            delivered: BTreeSet::new(),
            pending: HashSet::new(),
            rest: BTreeMap::new(),
            merged: Objects::default(),
            pods: HashMap::new(),
            pod_count: 0,
            by_ip: Claims::new(true),
            local: HashMap::new(),
            local_keys: HashMap::new(),
            local_by_ip: HashMap::new(),
            services: Layered::default(),
            slices: Layered::default(),
            index: Index::default(),
        }
    }
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
    /// Time of each pod change (records, index, lock included).
    pod_change_seconds: Histogram,
    /// Pod objects known, from all sources.
    pods_known: Gauge,
}

/// The union of several sources' non-pod objects: a Namespace known to both comes from the
/// later one.
fn merge<'a>(sources: impl Iterator<Item = &'a Objects>) -> Objects {
    let mut out = Objects::default();
    for o in sources {
        out.extend_from(o, false);
    }
    out
}

/// What one write to the store changed, to publish once per batch.
#[derive(Default)]
struct Changed {
    policies: bool,
    local: bool,
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
            // 1 µs to 16 ms.
            pod_change_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 15)),
            pods_known: Gauge::default(),
        })
    }

    /// The store's metrics, for `/metrics`.
    pub fn register_metrics(&self, r: &mut Registry) {
        r.register(
            "ambit_store_pod_change_seconds",
            "Time the workload store spent on one pod added, changed or deleted by a source",
            self.pod_change_seconds.clone(),
        );
        r.register(
            "ambit_store_pods",
            "Pod objects the workload store knows, from all sources",
            self.pods_known.clone(),
        );
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

    fn identity(&self, namespace: &str, pod: Option<&PodRecord>) -> Identity {
        let sa = pod.map_or("default", |p| &p.service_account);
        Identity::new(&self.trust_domain, namespace, sa)
    }

    fn workload(&self, pod: &PodRecord) -> Arc<Workload> {
        Arc::new(Workload {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            identity: self.identity(&pod.namespace, Some(pod)),
            hbone: pod.hbone,
            app: pod.app().map(Arc::from),
        })
    }

    /// Replaces everything the manifests directory said.
    pub fn set_manifests(&self, objects: Objects) {
        self.set_source(Source::Manifests, objects);
    }

    /// Declares a source that will deliver objects later: until it does, [`Store::synced`] is
    /// false and inbound connections are refused (policy unknown = deny).
    pub fn expect(&self, source: Source) {
        let mut inner = self.write();
        if !inner.delivered.contains(&source) {
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
    pub fn set_source(&self, source: Source, mut objects: Objects) {
        self.update(
            source,
            Update {
                pods: Keyed::Replace(std::mem::take(&mut objects.pods)),
                services: Keyed::Replace(std::mem::take(&mut objects.services)),
                slices: Keyed::Replace(std::mem::take(&mut objects.endpoint_slices)),
                rest: Some(objects),
            },
        );
    }

    /// Applies what one source says now, one change per write lock (readers never wait
    /// behind a batch), and publishes once.
    pub fn update(&self, source: Source, update: Update) {
        let mut changed = Changed::default();
        let had_pods = self.read().pod_count > 0;
        let Update {
            pods,
            services,
            slices,
            rest,
        } = update;
        let pods = pods.into_changes(|| {
            let inner = self.read();
            inner
                .pods
                .values()
                .flat_map(|m| m.values())
                .filter_map(|e| e.layers[source.layer()].as_ref())
                .map(|r| (r.namespace.to_string(), r.name.to_string()))
                .collect()
        });
        for c in pods {
            self.apply_pod(source, c, &mut changed);
        }
        for c in services.into_changes(|| self.read().services.keys(source)) {
            let mut guard = self.write();
            let inner = &mut *guard;
            if let Some((key, _)) = inner.services.apply(source, c) {
                let (services, slices) = (&inner.services.merged, &inner.slices.merged);
                inner
                    .index
                    .apply([key], [], services, slices, &self.services);
            }
        }
        for c in slices.into_changes(|| self.read().slices.keys(source)) {
            let mut guard = self.write();
            let inner = &mut *guard;
            if let Some(change) = inner.slices.apply(source, c) {
                let (services, slices) = (&inner.services.merged, &inner.slices.merged);
                inner
                    .index
                    .apply([], [change], services, slices, &self.services);
            }
        }
        {
            let mut inner = self.write();
            if inner.pending.remove(&source) | inner.delivered.insert(source) {
                changed.policies = true;
            }
            if let Some(mut rest) = rest {
                (rest.pods, rest.services, rest.endpoint_slices) = Default::default();
                inner.rest.insert(source, rest);
                let merged = merge(inner.rest.values());
                if inner.merged.policies != merged.policies
                    || inner.merged.peer_auths != merged.peer_auths
                {
                    changed.policies = true;
                }
                inner.merged = merged;
            }
            // Whether pods are declared at all decides how unknown pods are treated.
            if (inner.pod_count > 0) != had_pods {
                changed.policies = true;
            }
            self.pods_known.set(inner.pod_count as i64);
        }
        if changed.local {
            self.refresh_local();
        }
        self.objects_version.send_modify(|v| *v += 1);
        if changed.policies {
            self.policy_version.send_modify(|v| *v += 1);
        }
    }

    /// One pod change, under one write lock.
    fn apply_pod(&self, source: Source, change: Change<PodRecord>, changed: &mut Changed) {
        let started = std::time::Instant::now();
        self.change_pod(source, change, changed);
        self.pod_change_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    fn change_pod(&self, source: Source, change: Change<PodRecord>, changed: &mut Changed) {
        let ((namespace, name), record) = match change {
            Change::Upsert(k, r) => (k, Some(r)),
            Change::Delete(k) => (k, None),
        };
        let layer = source.layer();
        // Built before the lock: the allocations of the change.
        let built = record.as_ref().map(|r| (r.clone(), self.workload(r)));
        let mut guard = self.write();
        let inner = &mut *guard;
        let before = inner.record(&namespace, &name).cloned();
        let entry = inner
            .pods
            .get_mut(namespace.as_str())
            .and_then(|m| m.get_mut(name.as_str()));
        match (entry, record) {
            (Some(e), r) => {
                if e.layers[layer] == r {
                    return;
                }
                e.layers[layer] = r;
            }
            (None, None) => return,
            (None, Some(r)) => {
                let workload = built.as_ref().expect("built for an upsert").1.clone();
                let mut layers = [None, None];
                layers[layer] = Some(r.clone());
                inner
                    .pods
                    .entry(r.namespace.clone())
                    .or_default()
                    .insert(r.name.clone(), PodEntry { layers, workload });
                inner.pod_count += 1;
            }
        }
        let after = inner.record(&namespace, &name).cloned();
        if before == after {
            // Another source's record stays in force.
            return;
        }
        if let Some(b) = &before {
            let old = inner.pods[namespace.as_str()][name.as_str()]
                .workload
                .clone();
            for ip in b.ips.iter() {
                inner.by_ip.release(ip, old.owner());
            }
        }
        match &after {
            Some(a) => {
                let w = match &built {
                    Some((r, w)) if Arc::ptr_eq(r, a) => w.clone(),
                    _ => self.workload(a),
                };
                if let Some(e) = inner
                    .pods
                    .get_mut(namespace.as_str())
                    .and_then(|m| m.get_mut(name.as_str()))
                {
                    e.workload = w.clone();
                }
                for ip in a.ips.iter() {
                    inner.by_ip.claim(*ip, w.clone());
                }
            }
            None => {
                if let Some(m) = inner.pods.get_mut(namespace.as_str()) {
                    m.remove(name.as_str());
                    if m.is_empty() {
                        inner.pods.remove(namespace.as_str());
                    }
                }
                inner.pod_count -= 1;
            }
        }
        if inner.local_keys.contains_key(&(namespace, name)) {
            changed.local = true;
            if before.as_ref().map(|r| &r.labels) != after.as_ref().map(|r| &r.labels) {
                changed.policies = true;
            }
        }
    }

    /// Rebuilds the workloads of the pods this node captured (few).
    fn refresh_local(&self) {
        let mut inner = self.write();
        let mut by_ip = HashMap::new();
        for p in inner.local.values() {
            let obj = inner.record(&p.namespace, &p.name);
            let w = Arc::new(Workload {
                name: p.name.as_str().into(),
                namespace: p.namespace.as_str().into(),
                identity: self.identity(&p.namespace, obj.map(|r| &**r)),
                hbone: true,
                app: obj.and_then(|r| r.app()).map(Arc::from),
            });
            for ip in &p.ips {
                by_ip.insert(ip.to_canonical(), w.clone());
            }
        }
        inner.local_by_ip = by_ip;
    }

    /// Bumped on every update from any source.
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
        let Some(pod) = inner.record(namespace, name) else {
            return Enrollment::Undecided;
        };
        if !uid.is_empty() && !pod.uid.is_empty() && *pod.uid != *uid {
            // An older pod of the same name: the new one is not known yet.
            return Enrollment::Undecided;
        }
        let Some(labels) = &pod.labels else {
            // Its object says another node, so its labels were not kept: never guessed
            // (see [`Store::elsewhere`]).
            return Enrollment::Undecided;
        };
        let ns = inner.merged.namespaces.get(namespace);
        enrollment::by_labels(Some(labels), ns.map(|l| &**l))
    }

    /// Why the pod `namespace/name` (with `uid`, if known), though known, has no labels
    /// here: its object says it runs on another node than this agent's `--node-name` (`None`
    /// if it has its labels, or the object is an older pod of that name). Conclusive (a pod
    /// never changes node): on the node that runs it, `--node-name` is not the kubelet's.
    pub fn elsewhere(&self, namespace: &str, name: &str, uid: &str) -> Option<String> {
        let inner = self.read();
        let pod = inner.record(namespace, name)?;
        let same = uid.is_empty() || pod.uid.is_empty() || *pod.uid == *uid;
        (same && pod.labels.is_none()).then(|| self.not_here(pod))
    }

    fn not_here(&self, pod: &PodRecord) -> String {
        format!(
            "pod {}/{} is scheduled on node {:?} by its object, not on this agent's node {:?}, so its labels were not kept: --node-name must be the kubelet's node name (spec.nodeName)",
            pod.namespace,
            pod.name,
            pod.node.as_deref().unwrap_or_default(),
            self.node_name().unwrap_or_default()
        )
    }

    /// This agent's node (`--node-name`), if known.
    pub fn node_name(&self) -> Option<&str> {
        self.services.node.as_deref()
    }

    /// Does any source provide Pod objects (so [`Store::enrollment`] can ever answer)?
    pub fn has_sources(&self) -> bool {
        let inner = self.read();
        !inner.delivered.is_empty() || !inner.pending.is_empty()
    }

    /// (namespace, name, uid) of every pod this node captured.
    pub fn local_pods(&self) -> Vec<(String, String, String)> {
        self.read()
            .local
            .values()
            .map(|p| (p.namespace.clone(), p.name.clone(), p.uid.clone()))
            .collect()
    }

    /// The record of the Pod object `namespace/name`, if a source knows it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<PodRecord>> {
        self.read().record(namespace, name).cloned()
    }

    /// How every policy object was taken.
    pub fn policy_statuses(&self) -> Vec<Status> {
        self.read().merged.statuses.clone()
    }

    /// A pod this node captured (CNI ADD or re-adoption).
    pub fn pod_added(&self, pod: &PodInfo) {
        {
            let mut inner = self.write();
            if let Some(old) = inner.local.insert(pod.container_id.clone(), pod.clone()) {
                release_key(&mut inner.local_keys, &old);
            }
            *inner
                .local_keys
                .entry((pod.namespace.clone(), pod.name.clone()))
                .or_default() += 1;
        }
        self.refresh_local();
        self.local_version.send_modify(|v| *v += 1);
    }

    pub fn pod_removed(&self, container_id: &str) {
        let removed = {
            let mut inner = self.write();
            let old = inner.local.remove(container_id);
            if let Some(old) = &old {
                release_key(&mut inner.local_keys, old);
            }
            old.is_some()
        };
        if removed {
            self.refresh_local();
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
                let obj = inner.record(&p.namespace, &p.name);
                self.identity(&p.namespace, obj.map(|r| &**r))
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
        (inner.pod_count, inner.merged.namespaces.len())
    }

    /// (Services with a VIP, their endpoints over all ports).
    pub fn service_counts(&self) -> (usize, usize) {
        self.read().index.counts()
    }

    /// Services and endpoints known, for the admin view.
    pub fn services_dump(&self) -> Vec<serde_json::Value> {
        self.read().index.dump()
    }
}

fn release_key(keys: &mut HashMap<(String, String), usize>, pod: &PodInfo) {
    let k = (pod.namespace.clone(), pod.name.clone());
    if let Some(n) = keys.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            keys.remove(&k);
        }
    }
}

impl Directory for Store {
    fn by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let ip = ip.to_canonical();
        let inner = self.read();
        inner
            .local_by_ip
            .get(&ip)
            .or_else(|| inner.by_ip.get(&ip))
            .cloned()
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        self.read().local_by_ip.contains_key(&ip.to_canonical())
    }

    fn service(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.read().index.vip(&ip.to_canonical()).cloned()
    }

    fn in_service_range(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.services.service_cidrs.iter().any(|n| n.contains(&ip))
    }

    fn service_of_endpoint(&self, addr: SocketAddr) -> Option<Arc<ServiceName>> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.read().index.endpoint(&addr).cloned()
    }

    fn identity_of(&self, namespace: &str, name: &str) -> Identity {
        let inner = self.read();
        self.identity(namespace, inner.record(namespace, name).map(|r| &**r))
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
        let pod = inner.record(namespace, name).or_else(|| {
            let w = inner
                .by_ip
                .get(&conn.dst_ip.to_canonical())
                .filter(|w| *w.namespace == *namespace)?;
            inner.record(&w.namespace, &w.name)
        });
        // Where pods are declared (the Kubernetes source, or Pod objects in the manifests) or
        // a policy selects workloads by labels, a pod the source does not know has unknown
        // labels and service account: which policies select it cannot be told. Where nothing
        // declares pods and nothing selects by labels (a standalone agent, a manifests
        // directory of Services only), there is nothing its labels could change.
        let declares = |s: &Source| *s == Source::Kubernetes;
        let selects = |scope: &authz::Scope| matches!(scope, authz::Scope::Selector { .. });
        let knowable = inner.delivered.iter().any(declares)
            || inner.pending.iter().any(declares)
            || inner.pod_count > 0
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
                inner.delivered
            ));
        }
        if let Some(p) = pod.filter(|p| p.labels.is_none()) {
            return Decision::Deny(self.not_here(p));
        }
        let none = Labels::new();
        let labels = pod.and_then(|p| p.labels.as_deref()).unwrap_or(&none);
        authz::evaluate(
            &inner.merged.policies,
            &inner.merged.peer_auths,
            namespace,
            labels,
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
    use ambit_common::enrollment::REDIRECTION_ANNOTATION;
    use k8s_openapi::api::core::v1::Pod;

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
            o.add_pod(crate::records::pod_record(&p, None).unwrap());
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

    fn record(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Arc<PodRecord> {
        let mut p = pod(ns, name, None, ip, true);
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Arc::new(crate::records::pod_record(&p, None).unwrap())
    }

    fn upsert(r: Arc<PodRecord>) -> Change<PodRecord> {
        Change::Upsert((r.namespace.to_string(), r.name.to_string()), r)
    }

    fn delete(namespace: &str, name: &str) -> Change<PodRecord> {
        Change::Delete((namespace.into(), name.into()))
    }

    fn changes(pods: Vec<Change<PodRecord>>) -> Update {
        Update {
            pods: Keyed::Changes(pods),
            ..Update::default()
        }
    }

    fn owner(s: &Store, ip: &str) -> Option<String> {
        s.by_ip(ip.parse().unwrap())
            .map(|w| format!("{}/{}", w.namespace, w.name))
    }

    #[test]
    fn pod_events_change_the_index_in_place_and_the_later_source_wins() {
        let s = Store::new("td");
        let k8s = Source::Kubernetes;
        s.update(
            k8s,
            changes(vec![
                upsert(record("a", "web", "10.0.0.1", &[])),
                upsert(record("a", "db", "10.0.0.2", &[])),
            ]),
        );
        assert_eq!(s.counts().0, 2);
        assert_eq!(owner(&s, "10.0.0.1").as_deref(), Some("a/web"));
        // web moves to a new address: the old one is free.
        s.update(
            k8s,
            changes(vec![upsert(record("a", "web", "10.0.0.9", &[]))]),
        );
        assert_eq!(owner(&s, "10.0.0.1"), None);
        assert_eq!(owner(&s, "10.0.0.9").as_deref(), Some("a/web"));
        // An address claimed twice (a finished pod's address reused before its update):
        // the last by namespace and name, and the other again once it lets go.
        s.update(
            k8s,
            changes(vec![upsert(record("a", "zz", "10.0.0.2", &[]))]),
        );
        assert_eq!(owner(&s, "10.0.0.2").as_deref(), Some("a/zz"));
        s.update(k8s, changes(vec![delete("a", "zz")]));
        assert_eq!(owner(&s, "10.0.0.2").as_deref(), Some("a/db"));
        // The manifests say something else about db: the API server's record stays in force
        // until it goes.
        s.set_manifests(objects(vec![pod(
            "a",
            "db",
            Some("from-file"),
            "10.0.0.3",
            false,
        )]));
        assert_eq!(owner(&s, "10.0.0.2").as_deref(), Some("a/db"));
        assert_eq!(owner(&s, "10.0.0.3"), None);
        s.update(k8s, changes(vec![delete("a", "db")]));
        assert_eq!(owner(&s, "10.0.0.2"), None);
        let w = s.by_ip("10.0.0.3".parse().unwrap()).unwrap();
        assert_eq!(w.identity.service_account(), "from-file");
        assert_eq!(s.counts().0, 2, "web and the manifests' db");
        // A full list from the API server: what it no longer has is gone, the manifests'
        // pods stay.
        s.update(
            k8s,
            Update {
                pods: Keyed::Replace(BTreeMap::new()),
                ..Update::default()
            },
        );
        assert_eq!(owner(&s, "10.0.0.9"), None);
        assert_eq!(owner(&s, "10.0.0.3").as_deref(), Some("a/db"));
        assert_eq!(s.counts().0, 1);
    }

    #[test]
    fn policies_are_re_evaluated_for_policy_objects_and_local_pods_labels_only() {
        let s = Store::new("td");
        let k8s = Source::Kubernetes;
        let mut policy = s.policy_updates();
        let mut changed = || {
            let c = policy.has_changed().unwrap();
            policy.borrow_and_update();
            c
        };
        s.update(
            k8s,
            changes(vec![upsert(record("a", "remote", "10.0.1.1", &[]))]),
        );
        assert!(
            changed(),
            "the first pods (unknown pods' treatment changes)"
        );
        s.pod_added(&PodInfo {
            namespace: "a".into(),
            ..local("mine", "10.0.1.2")
        });
        let relabel = |name: &str, ip: &str, v: &str| {
            s.update(
                k8s,
                changes(vec![upsert(record("a", name, ip, &[("app", v)]))]),
            )
        };
        relabel("remote", "10.0.1.1", "x");
        assert!(!changed(), "a remote pod's labels decide nothing here");
        relabel("mine", "10.0.1.2", "x");
        assert!(changed(), "this node's pod: its labels select policies");
        relabel("mine", "10.0.1.2", "x");
        assert!(!changed(), "the same record again changes nothing");
        assert_eq!(
            s.by_ip("10.0.1.2".parse().unwrap()).unwrap().app.as_deref(),
            Some("x"),
            "the local pod's workload follows its object"
        );
        let mut o = Objects::default();
        o.policies.push(Arc::new(Policy {
            key: "a/p".into(),
            action: authz::Action::Deny,
            scope: authz::Scope::Namespace("a".into()),
            rules: vec![authz::Rule::default()],
        }));
        s.update(
            k8s,
            Update {
                rest: Some(o),
                ..Update::default()
            },
        );
        assert!(changed(), "a policy object");
    }

    fn svc(vip: &str) -> Arc<ServiceRecord> {
        Arc::new(ServiceRecord {
            vips: vec![vip.parse().unwrap()],
            ports: vec![("http".into(), 80)],
            node_local: false,
            distribution: ambit_proxy::service::Distribution::Any,
            client_affinity: false,
        })
    }

    fn slice_of(service: &str, ip: &str) -> Arc<SliceRecord> {
        Arc::new(SliceRecord {
            service: service.into(),
            ports: vec![("http".into(), 8080)],
            endpoints: vec![crate::services::EndpointRecord {
                ip: ip.parse().unwrap(),
                readiness: ambit_proxy::service::Readiness::Ready,
                node: None,
                zone: None,
                hint_zones: None,
            }],
        })
    }

    fn endpoints_of(s: &Store, vip: &str) -> Vec<String> {
        s.service(vip.parse().unwrap()).map_or(Vec::new(), |svc| {
            svc.ports
                .iter()
                .flat_map(|p| &p.endpoints)
                .map(|e| e.addr.to_string())
                .collect()
        })
    }

    #[test]
    fn services_and_slices_change_one_at_a_time_and_the_later_source_wins() {
        let s = Store::new("td");
        let k8s = Source::Kubernetes;
        let key = |n: &str| ("shop".to_string(), n.to_string());
        let mut o = Objects::default();
        o.services.insert(key("web"), svc("10.96.0.1"));
        o.endpoint_slices
            .insert(key("web-1"), slice_of("web", "10.1.0.1"));
        s.set_manifests(o);
        assert_eq!(endpoints_of(&s, "10.96.0.1"), ["10.1.0.1:8080"]);
        // The API server says the Service has another VIP and adds a slice: its record is in
        // force, the manifests' slice still counts (slices are merged by their own key).
        s.update(
            k8s,
            Update {
                services: Keyed::Changes(vec![Change::Upsert(key("web"), svc("10.96.0.2"))]),
                slices: Keyed::Changes(vec![Change::Upsert(
                    key("web-2"),
                    slice_of("web", "10.1.0.2"),
                )]),
                ..Update::default()
            },
        );
        assert!(s.service("10.96.0.1".parse().unwrap()).is_none());
        assert_eq!(
            endpoints_of(&s, "10.96.0.2"),
            ["10.1.0.1:8080", "10.1.0.2:8080"]
        );
        // A slice moves to another Service: both are derived again.
        let mut other = Objects::default();
        other.services.insert(key("web"), svc("10.96.0.1"));
        other.services.insert(key("api"), svc("10.96.0.3"));
        other
            .endpoint_slices
            .insert(key("web-1"), slice_of("api", "10.1.0.1"));
        s.set_manifests(other);
        assert_eq!(endpoints_of(&s, "10.96.0.2"), ["10.1.0.2:8080"]);
        assert_eq!(endpoints_of(&s, "10.96.0.3"), ["10.1.0.1:8080"]);
        // The API server's record goes: the manifests' is in force again.
        s.update(
            k8s,
            Update {
                services: Keyed::Changes(vec![Change::Delete(key("web"))]),
                ..Update::default()
            },
        );
        assert_eq!(endpoints_of(&s, "10.96.0.1"), ["10.1.0.2:8080"]);
        assert!(s.service("10.96.0.2".parse().unwrap()).is_none());
        // A whole list from the API server without its slice: only its own records go.
        s.update(
            k8s,
            Update {
                slices: Keyed::Replace(BTreeMap::new()),
                ..Update::default()
            },
        );
        assert!(endpoints_of(&s, "10.96.0.1").is_empty());
        assert_eq!(endpoints_of(&s, "10.96.0.3"), ["10.1.0.1:8080"]);
        assert_eq!(s.service_counts(), (2, 1));
    }

    #[test]
    fn pods_of_other_nodes_keep_no_labels_and_are_never_decided_by_missing_ones() {
        use ambit_common::enrollment::ENROLLMENT_LABEL;
        let s = Store::with_services(
            "td",
            ServiceSettings {
                node: Some("node-a".into()),
                ..ServiceSettings::default()
            },
        );
        let on = |name: &str, ip: &str, node: &str| {
            let mut p = pod("a", name, None, ip, false);
            p.metadata.uid = Some(format!("u-{name}"));
            p.metadata.labels =
                Some([(ENROLLMENT_LABEL.to_string(), "enabled".to_string())].into());
            p.spec.as_mut().unwrap().node_name = Some(node.into());
            crate::records::pod_record(&p, s.node_name()).unwrap()
        };
        let mut o = Objects::default();
        o.add_pod(on("here", "10.0.2.1", "node-a"));
        o.add_pod(on("there", "10.0.2.2", "node-b"));
        s.set_manifests(o);
        assert!(matches!(
            s.enrollment("a", "here", "u-here"),
            Enrollment::Capture(_)
        ));
        assert!(s.elsewhere("a", "here", "u-here").is_none());
        // A pod of another node: its identity and HBONE decision stand, its labels are not
        // here, so enrollment is not decided from their absence and the CNI plugin is told why.
        assert_eq!(s.pod("a", "there").unwrap().labels, None);
        assert_eq!(s.enrollment("a", "there", "u-there"), Enrollment::Undecided);
        let answer =
            crate::cni_server::enrollment(&s, "a", "there", "u-there", std::time::Duration::ZERO);
        let error = answer.error.unwrap_or_default();
        assert!(
            !answer.ok && error.contains("node \"node-b\"") && error.contains("--node-name"),
            "{error}"
        );
        assert!(
            s.elsewhere("a", "there", "u-new").is_none(),
            "a new pod of that name is not the object seen"
        );
        // Were it served here all the same (a wrong --node-name), inbound is refused, not
        // judged as if it had no labels.
        let conn = Connection {
            src_identity: None,
            src_ip: "10.0.9.9".parse().unwrap(),
            dst_ip: "10.0.2.2".parse().unwrap(),
            dst_port: 80,
        };
        match s.authorize("a", "there", &conn) {
            Decision::Deny(why) => assert!(why.contains("--node-name"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.authorize("a", "here", &conn), Decision::Allow));
    }
}
