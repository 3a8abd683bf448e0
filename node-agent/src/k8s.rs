//! The Kubernetes API server as a source for the workload store (kube-rs watchers).
//!
//! Kept thin on purpose: it watches Pods (all of them: this node's for identity and enrollment,
//! the others for remote identities, labels and the redirection annotation), Namespaces
//! (enrollment labels), Services and EndpointSlices (VIPs and their endpoints), and Istio's
//! AuthorizationPolicy and PeerAuthentication. Each object is converted as it arrives, by the
//! code the manifests directory uses ([`crate::records`], [`crate::services`],
//! [`crate::policy`]), and nothing else of it is kept: pods go to the store one change at a
//! time (a burst of events is one update), the other kinds, few, as the source's snapshot of
//! them when one changed. Everything that decides anything lives in the store and the policy
//! module, so the manifests-driven end-to-end tests exercise it.
//!
//! - Watches are kube-rs watchers with their default back-off: a failed list or watch is
//!   retried, an expired resourceVersion (410) re-lists, and a re-list replaces the cache
//!   atomically (objects deleted meanwhile disappear).
//! - The store gets a first snapshot only once every kind has listed; until then the agent is
//!   not ready and refuses inbound connections (policy unknown). A policy kind whose CRD is
//!   not installed (404) counts as listed and empty, with a warning.
//! - Once this node captured a pod, the pod is annotated `ambit.dev/redirection: enabled`
//!   (through the `pods/status` subresource, the narrowest permission that allows it), so
//!   other nodes send it HBONE. Only pods the agent really serves are annotated.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::records::{Labels, PodRecord};
use crate::services::{ServiceRecord, SliceRecord};
use crate::store::{Objects, PodChange, Pods, Source, Store};
use ambit_common::enrollment::REDIRECTION_ANNOTATION;

/// The Istio security API group and the version watched.
const ISTIO_GROUP: &str = "security.istio.io";
const ISTIO_VERSION: &str = "v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Pod,
    Namespace,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    PeerAuthentication,
}

/// A full list being received (the first, or a re-list after an expired watch), until the
/// watcher says it is complete.
struct Listing<V>(Option<BTreeMap<(String, String), V>>);

impl<V> Default for Listing<V> {
    fn default() -> Self {
        Self(None)
    }
}

impl<V> Listing<V> {
    fn start(&mut self) {
        self.0 = Some(BTreeMap::new());
    }

    fn add(&mut self, key: (String, String), v: Option<V>) {
        if let Some(v) = v {
            self.0.get_or_insert_with(BTreeMap::new).insert(key, v);
        }
    }

    fn done(&mut self) -> BTreeMap<(String, String), V> {
        self.0.take().unwrap_or_default()
    }
}

/// One kind's objects, converted as the watcher reported them.
struct Cache<V> {
    items: BTreeMap<(String, String), V>,
    building: Listing<V>,
    synced: bool,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            building: Listing::default(),
            synced: false,
        }
    }
}

fn key<K: Resource>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

impl<V> Cache<V> {
    /// Applies one event, keeping what `convert` makes of the object (nothing, if `None`: an
    /// object the agent has no use for, as a Service without a VIP); returns whether the
    /// visible set changed.
    fn apply<K: Resource>(&mut self, ev: Event<K>, convert: impl Fn(&K) -> Option<V>) -> bool {
        match ev {
            Event::Init => {
                self.building.start();
                false
            }
            Event::InitApply(o) => {
                self.building.add(key(&o), convert(&o));
                false
            }
            Event::InitDone => {
                self.items = self.building.done();
                self.synced = true;
                true
            }
            Event::Apply(o) => {
                match convert(&o) {
                    Some(v) => {
                        self.items.insert(key(&o), v);
                    }
                    None => {
                        self.items.remove(&key(&o));
                    }
                }
                true
            }
            Event::Delete(o) => self.items.remove(&key(&o)).is_some(),
        }
    }

    /// The kind does not exist on this cluster (CRD not installed): empty, and listed.
    fn absent(&mut self) -> bool {
        let changed = !self.synced || !self.items.is_empty();
        self.items.clear();
        self.building = Listing::default();
        self.synced = true;
        changed
    }
}

/// Pods, converted to records on arrival; the store holds them, this keeps only what it has
/// not been given yet.
#[derive(Default)]
struct PodCache {
    building: Listing<Arc<PodRecord>>,
    /// A full list received and not given to the store yet: it replaces the source's pods
    /// (pods deleted while the watch was down disappear); later events amend it.
    listed: Option<BTreeMap<(String, String), Arc<PodRecord>>>,
    /// Changes since the last update of the store.
    changes: Vec<PodChange>,
    synced: bool,
}

impl PodCache {
    fn apply(&mut self, ev: Event<Pod>) -> bool {
        let record = |p: &Pod| crate::records::pod_record(p).map(Arc::new);
        match ev {
            Event::Init => {
                self.building.start();
                false
            }
            Event::InitApply(p) => {
                self.building.add(key(&p), record(&p));
                false
            }
            Event::InitDone => {
                self.listed = Some(self.building.done());
                self.changes.clear();
                self.synced = true;
                true
            }
            Event::Apply(p) => {
                let Some(r) = record(&p) else { return false };
                match &mut self.listed {
                    Some(all) => {
                        all.insert(key(&p), r);
                    }
                    None => self.changes.push(PodChange::Upsert(r)),
                }
                true
            }
            Event::Delete(p) => {
                let (namespace, name) = key(&p);
                match &mut self.listed {
                    Some(all) => all.remove(&(namespace, name)).is_some(),
                    None => {
                        self.changes.push(PodChange::Delete { namespace, name });
                        true
                    }
                }
            }
        }
    }

    /// What the store has not been given yet.
    fn take(&mut self) -> Pods {
        match self.listed.take() {
            Some(all) => Pods::Replace(all),
            None => Pods::Changes(std::mem::take(&mut self.changes)),
        }
    }
}

#[derive(Default)]
struct Caches {
    pods: PodCache,
    namespaces: Cache<Arc<Labels>>,
    services: Cache<Arc<ServiceRecord>>,
    slices: Cache<Arc<SliceRecord>>,
    policies: Cache<DynamicObject>,
    peer_auths: Cache<DynamicObject>,
}

impl Caches {
    /// The cache of one of the two policy kinds.
    fn policy_cache(&mut self, kind: Kind) -> &mut Cache<DynamicObject> {
        if kind == Kind::AuthorizationPolicy {
            &mut self.policies
        } else {
            &mut self.peer_auths
        }
    }

    fn synced(&self) -> bool {
        self.pods.synced
            && self.namespaces.synced
            && self.services.synced
            && self.slices.synced
            && self.policies.synced
            && self.peer_auths.synced
    }

    /// Everything but the pods, for the store, converted exactly as manifests are.
    fn rest(&self, root_ns: &str) -> Objects {
        let mut o = Objects::default();
        for ((_, name), labels) in &self.namespaces.items {
            o.namespaces.insert(name.clone(), labels.clone());
        }
        o.services = self.services.items.clone();
        o.endpoint_slices = self.slices.items.clone();
        for (kind, cache) in [
            ("AuthorizationPolicy", &self.policies),
            ("PeerAuthentication", &self.peer_auths),
        ] {
            for obj in cache.items.values() {
                let mut obj = obj.clone();
                // List items may omit their type; the converter checks it.
                obj.types = Some(kube::api::TypeMeta {
                    api_version: format!("{ISTIO_GROUP}/{ISTIO_VERSION}"),
                    kind: kind.into(),
                });
                let value = match serde_yaml_ng::to_value(&obj) {
                    Ok(v) => v,
                    Err(e) => {
                        warn!(kind, name = %obj.name_any(), "cannot convert: {e}");
                        continue;
                    }
                };
                if kind == "AuthorizationPolicy" {
                    let (policy, status) = crate::policy::authorization_policy(&value, root_ns);
                    o.policies.extend(policy.map(Arc::new));
                    o.statuses.push(status);
                } else {
                    let (pa, status) = crate::policy::peer_authentication(&value, root_ns);
                    o.peer_auths.push(pa);
                    o.statuses.push(status);
                }
            }
        }
        o
    }
}

fn service(svc: &Service) -> Option<Arc<ServiceRecord>> {
    match crate::services::service_record(svc) {
        Ok(r) => r.map(Arc::new),
        Err(e) => {
            warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), "Service skipped: {e}");
            None
        }
    }
}

fn slice(s: &EndpointSlice) -> Option<Arc<SliceRecord>> {
    match crate::services::slice_record(s) {
        Ok(r) => r.map(Arc::new),
        Err(e) => {
            warn!(slice = %format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()), "EndpointSlice skipped: {e}");
            None
        }
    }
}

enum Update {
    Pod(Box<Event<Pod>>),
    Namespace(Event<Namespace>),
    Service(Box<Event<Service>>),
    Slice(Event<EndpointSlice>),
    Policy(Kind, Event<DynamicObject>),
    Failed(Kind, watcher::Error),
}

fn istio(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(ISTIO_GROUP, ISTIO_VERSION, kind))
}

fn is_not_found(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(r)) if r.code == 404
    )
}

/// Feeds `store` from the API server until `stop`. Declares itself to the store first, so
/// the agent is not ready (and refuses inbound connections) until the first full snapshot.
pub async fn run(client: Client, store: Arc<Store>, root_ns: String, stop: CancellationToken) {
    store.expect(Source::Kubernetes);
    let cfg = watcher::Config::default;
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Update::Pod(Box::new(ev)),
            Err(e) => Update::Failed(Kind::Pod, e),
        })
        .boxed();
    let namespaces = watcher::watcher(Api::<Namespace>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Update::Namespace(ev),
            Err(e) => Update::Failed(Kind::Namespace, e),
        })
        .boxed();
    let services = watcher::watcher(Api::<Service>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Update::Service(Box::new(ev)),
            Err(e) => Update::Failed(Kind::Service, e),
        })
        .boxed();
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Update::Slice(ev),
            Err(e) => Update::Failed(Kind::EndpointSlice, e),
        })
        .boxed();
    let policy_stream = |kind: Kind, name: &str| {
        let ar = istio(name);
        watcher::watcher(Api::<DynamicObject>::all_with(client.clone(), &ar), cfg())
            .default_backoff()
            .map(move |r| match r {
                Ok(ev) => Update::Policy(kind, ev),
                Err(e) => Update::Failed(kind, e),
            })
            .boxed()
    };
    let mut updates = futures_util::stream::select_all([
        pods,
        namespaces,
        services,
        slices,
        policy_stream(Kind::AuthorizationPolicy, "AuthorizationPolicy"),
        policy_stream(Kind::PeerAuthentication, "PeerAuthentication"),
    ]);
    let mut caches = Caches::default();
    let mut reported = HashSet::new();
    let mut failing: HashSet<Kind> = HashSet::new();
    let annotator = tokio::spawn(annotate(client, store.clone(), stop.clone()));
    // What changed since the store was last updated (kept until every kind has listed).
    let (mut pods_changed, mut rest_changed) = (false, false);
    let mut first = true;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            u = updates.next() => match u {
                Some(u) => u,
                None => break,
            },
        };
        // Take everything already waiting, then update the store once.
        let mut batch = vec![next];
        while let Some(Some(u)) = futures_util::FutureExt::now_or_never(updates.next()) {
            batch.push(u);
        }
        for u in batch {
            let (kind, changed) = apply(&mut caches, u, &mut failing);
            if kind == Kind::Pod {
                pods_changed |= changed;
            } else {
                rest_changed |= changed;
            }
        }
        if !(pods_changed || rest_changed) || !caches.synced() {
            continue;
        }
        let rest = (rest_changed || first).then(|| caches.rest(&root_ns));
        let pods = caches.pods.take();
        let full = matches!(pods, Pods::Replace(_));
        let statuses = rest.as_ref().map(|r| r.statuses.clone());
        if first || full || rest.is_some() {
            let (namespaces, services, slices) = (
                caches.namespaces.items.len(),
                caches.services.items.len(),
                caches.slices.items.len(),
            );
            info!(
                pods = match &pods {
                    Pods::Replace(all) => all.len(),
                    Pods::Changes(c) => c.len(),
                },
                full,
                namespaces,
                services,
                endpoint_slices = slices,
                "Kubernetes update"
            );
        } else if let Pods::Changes(c) = &pods {
            debug!(pod_changes = c.len(), "Kubernetes update");
        }
        // Off the runtime threads, which carry the pods' traffic: a first list of 100,000 pods
        // is ~1 s of store work (each change takes the store's lock alone, so lookups go on).
        let s = store.clone();
        let done =
            tokio::task::spawn_blocking(move || s.update(Source::Kubernetes, pods, rest)).await;
        if let Err(e) = done {
            warn!("the workload store update failed: {e}");
        }
        if let Some(statuses) = statuses {
            reported = crate::manifests::report_statuses(&statuses, &reported);
        }
        (pods_changed, rest_changed, first) = (false, false, false);
    }
    annotator.abort();
}

fn apply(caches: &mut Caches, u: Update, failing: &mut HashSet<Kind>) -> (Kind, bool) {
    let (kind, changed) = match u {
        Update::Pod(ev) => (Kind::Pod, caches.pods.apply(*ev)),
        Update::Namespace(ev) => (
            Kind::Namespace,
            caches
                .namespaces
                .apply(ev, |n| crate::records::namespace_record(n).map(|(_, l)| l)),
        ),
        Update::Service(ev) => (Kind::Service, caches.services.apply(*ev, service)),
        Update::Slice(ev) => (Kind::EndpointSlice, caches.slices.apply(ev, slice)),
        Update::Policy(k, ev) => (k, caches.policy_cache(k).apply(ev, |o| Some(o.clone()))),
        Update::Failed(kind, e) => {
            if matches!(kind, Kind::AuthorizationPolicy | Kind::PeerAuthentication)
                && is_not_found(&e)
            {
                if failing.insert(kind) {
                    warn!(
                        ?kind,
                        "the {ISTIO_GROUP} CRD is not installed: no such policies (retrying)"
                    );
                }
                return (kind, caches.policy_cache(kind).absent());
            }
            if failing.insert(kind) {
                warn!(
                    ?kind,
                    "Kubernetes watch failed (retrying with back-off): {e}"
                );
            } else {
                debug!(?kind, "Kubernetes watch still failing: {e}");
            }
            return (kind, false);
        }
    };
    if failing.remove(&kind) {
        info!(?kind, "Kubernetes watch recovered");
    }
    (kind, changed)
}

/// Annotates the pods this node serves with `ambit.dev/redirection: enabled` until `stop`:
/// after every capture, and every 30 s for any patch that failed.
async fn annotate(client: Client, store: Arc<Store>, stop: CancellationToken) {
    let mut local = store.local_updates();
    let mut objects = store.object_updates();
    let mut done: HashMap<(String, String), String> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = local.changed() => {}
            _ = objects.changed() => {}
            _ = tick.tick() => {}
        }
        let pods = store.local_pods();
        let live: HashSet<(String, String)> = pods
            .iter()
            .map(|(ns, n, _)| (ns.clone(), n.clone()))
            .collect();
        done.retain(|k, _| live.contains(k));
        for (ns, name, uid) in pods {
            let Some(obj) = store.pod(&ns, &name) else {
                continue; // Not listed yet: annotated once it is.
            };
            let obj_uid = obj.uid.to_string();
            if !uid.is_empty() && !obj_uid.is_empty() && uid != obj_uid {
                continue; // The object is an older pod of that name.
            }
            let annotated = obj.hbone;
            let key = (ns.clone(), name.clone());
            if annotated || done.get(&key) == Some(&obj_uid) {
                continue;
            }
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let patch = serde_json::json!({
                "metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}
            });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(pod = %format!("{ns}/{name}"), "annotated {REDIRECTION_ANNOTATION}=enabled");
                    done.insert(key, obj_uid);
                }
                Err(e) => {
                    warn!(pod = %format!("{ns}/{name}"), "cannot annotate the pod (retrying): {e}")
                }
            }
        }
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod double;
#[cfg(test)]
mod tests;
