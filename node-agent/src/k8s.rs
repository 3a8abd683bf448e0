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

use crate::records::{Context, Labels, PodRecord};
use crate::services::{ServiceRecord, SliceRecord};
use crate::store::{Change, Key, Keyed, Objects, Source, Store, Update};
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

/// A kind the store keeps as records (Pods, Services, EndpointSlices): each object is
/// converted on arrival, and this keeps only what the store has not been given yet.
struct Records<V> {
    building: Listing<Arc<V>>,
    /// A full list received and not given to the store yet: it replaces the source's set
    /// (objects deleted while the watch was down disappear); later events amend it.
    listed: Option<BTreeMap<Key, Arc<V>>>,
    /// Changes since the last update of the store.
    changes: Vec<Change<V>>,
    synced: bool,
}

impl<V> Default for Records<V> {
    fn default() -> Self {
        Self {
            building: Listing::default(),
            listed: None,
            changes: Vec::new(),
            synced: false,
        }
    }
}

impl<V> Records<V> {
    /// Applies one event, keeping what `convert` makes of the object (nothing, if `None`: an
    /// object the agent has no use for, as a Service without a VIP, which deletes the record
    /// it had); returns whether the store has something new to learn.
    fn apply<K: Resource>(&mut self, ev: Event<K>, convert: impl Fn(&K) -> Option<V>) -> bool {
        let change = match ev {
            Event::Init => {
                self.building.start();
                return false;
            }
            Event::InitApply(o) => {
                self.building.add(key(&o), convert(&o).map(Arc::new));
                return false;
            }
            Event::InitDone => {
                self.listed = Some(self.building.done());
                self.changes.clear();
                self.synced = true;
                return true;
            }
            Event::Apply(o) => match convert(&o) {
                Some(v) => Change::Upsert(key(&o), Arc::new(v)),
                None => Change::Delete(key(&o)),
            },
            Event::Delete(o) => Change::Delete(key(&o)),
        };
        match (&mut self.listed, change) {
            (Some(all), Change::Upsert(k, v)) => {
                all.insert(k, v);
                true
            }
            (Some(all), Change::Delete(k)) => all.remove(&k).is_some(),
            (None, c) => {
                self.changes.push(c);
                true
            }
        }
    }

    /// What the store has not been given yet.
    fn take(&mut self) -> Keyed<V> {
        match self.listed.take() {
            Some(all) => Keyed::Replace(all),
            None => Keyed::Changes(std::mem::take(&mut self.changes)),
        }
    }
}

#[derive(Default)]
struct Caches {
    pods: Records<PodRecord>,
    namespaces: Cache<Arc<Labels>>,
    services: Records<ServiceRecord>,
    slices: Records<SliceRecord>,
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

    /// Namespaces and policies, for the store, converted exactly as manifests are.
    fn rest(&self, root_ns: &str) -> Objects {
        let mut o = Objects::default();
        for ((_, name), labels) in &self.namespaces.items {
            o.namespaces.insert(name.clone(), labels.clone());
        }
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

fn service(svc: &Service) -> Option<ServiceRecord> {
    match crate::services::service_record(svc) {
        Ok(r) => r,
        Err(e) => {
            warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), "Service skipped: {e}");
            None
        }
    }
}

fn slice(s: &EndpointSlice) -> Option<SliceRecord> {
    match crate::services::slice_record(s) {
        Ok(r) => r,
        Err(e) => {
            warn!(slice = %format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()), "EndpointSlice skipped: {e}");
            None
        }
    }
}

/// One item of the merged watch streams.
enum Watched {
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
pub async fn run(client: Client, store: Arc<Store>, cx: Context, stop: CancellationToken) {
    store.expect(Source::Kubernetes);
    let cfg = watcher::Config::default;
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Watched::Pod(Box::new(ev)),
            Err(e) => Watched::Failed(Kind::Pod, e),
        })
        .boxed();
    let namespaces = watcher::watcher(Api::<Namespace>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Watched::Namespace(ev),
            Err(e) => Watched::Failed(Kind::Namespace, e),
        })
        .boxed();
    let services = watcher::watcher(Api::<Service>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Watched::Service(Box::new(ev)),
            Err(e) => Watched::Failed(Kind::Service, e),
        })
        .boxed();
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Watched::Slice(ev),
            Err(e) => Watched::Failed(Kind::EndpointSlice, e),
        })
        .boxed();
    let policy_stream = |kind: Kind, name: &str| {
        let ar = istio(name);
        watcher::watcher(Api::<DynamicObject>::all_with(client.clone(), &ar), cfg())
            .default_backoff()
            .map(move |r| match r {
                Ok(ev) => Watched::Policy(kind, ev),
                Err(e) => Watched::Failed(kind, e),
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
    // What changed since the store was last updated (kept until every kind has listed):
    // records (pods, Services, slices) go as changes, the rest as a whole.
    let (mut records_changed, mut rest_changed) = (false, false);
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
            let (kind, changed) = apply(&mut caches, u, &cx, &mut failing);
            if matches!(kind, Kind::Pod | Kind::Service | Kind::EndpointSlice) {
                records_changed |= changed;
            } else {
                rest_changed |= changed;
            }
        }
        if !(records_changed || rest_changed) || !caches.synced() {
            continue;
        }
        let update = Update {
            pods: caches.pods.take(),
            services: caches.services.take(),
            slices: caches.slices.take(),
            rest: (rest_changed || first).then(|| caches.rest(&cx.root_namespace)),
        };
        let full = matches!(update.pods, Keyed::Replace(_));
        let statuses = update.rest.as_ref().map(|r| r.statuses.clone());
        if first || full || update.rest.is_some() {
            info!(
                pods = update.pods.len(),
                full,
                namespaces = caches.namespaces.items.len(),
                services = update.services.len(),
                endpoint_slices = update.slices.len(),
                "Kubernetes update"
            );
        } else {
            debug!(
                pod_changes = update.pods.len(),
                service_changes = update.services.len(),
                slice_changes = update.slices.len(),
                "Kubernetes update"
            );
        }
        // Off the runtime threads, which carry the pods' traffic: a first list of 100,000 pods
        // is ~1 s of store work (each change takes the store's lock alone, so lookups go on).
        let s = store.clone();
        let done = tokio::task::spawn_blocking(move || s.update(Source::Kubernetes, update)).await;
        if let Err(e) = done {
            warn!("the workload store update failed: {e}");
        }
        if let Some(statuses) = statuses {
            reported = crate::manifests::report_statuses(&statuses, &reported);
        }
        (records_changed, rest_changed, first) = (false, false, false);
    }
    annotator.abort();
}

fn apply(
    caches: &mut Caches,
    u: Watched,
    cx: &Context,
    failing: &mut HashSet<Kind>,
) -> (Kind, bool) {
    let (kind, changed) = match u {
        Watched::Pod(ev) => (
            Kind::Pod,
            caches
                .pods
                .apply(*ev, |p| crate::records::pod_record(p, cx.node.as_deref())),
        ),
        Watched::Namespace(ev) => (
            Kind::Namespace,
            caches
                .namespaces
                .apply(ev, |n| crate::records::namespace_record(n).map(|(_, l)| l)),
        ),
        Watched::Service(ev) => (Kind::Service, caches.services.apply(*ev, service)),
        Watched::Slice(ev) => (Kind::EndpointSlice, caches.slices.apply(ev, slice)),
        Watched::Policy(k, ev) => (k, caches.policy_cache(k).apply(ev, |o| Some(o.clone()))),
        Watched::Failed(kind, e) => {
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
