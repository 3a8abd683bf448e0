//! The Kubernetes API server as a source for the workload store (kube-rs watchers).
//!
//! Kept thin on purpose: it watches Pods (all of them: this node's for identity and enrollment,
//! the others for remote identities, labels and the redirection annotation), Namespaces
//! (enrollment labels), Services and EndpointSlices (VIPs and their endpoints), and Istio's
//! AuthorizationPolicy and PeerAuthentication, and hands the
//! store the same [`Objects`] snapshot the manifests directory produces, converted by the same
//! code ([`crate::policy`]). Everything that decides anything lives in the store and the
//! policy module, so the manifests-driven end-to-end tests exercise it.
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

use crate::store::{Objects, Source, Store};
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

/// One kind's objects, as the watcher reported them.
struct Cache<K> {
    items: BTreeMap<(String, String), K>,
    building: Option<BTreeMap<(String, String), K>>,
    synced: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            building: None,
            synced: false,
        }
    }
}

fn key<K: Resource>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

impl<K: Resource> Cache<K> {
    /// Applies one event; returns whether the visible set changed.
    fn apply(&mut self, ev: Event<K>) -> bool {
        match ev {
            Event::Init => {
                self.building = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                self.building
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&o), o);
                false
            }
            Event::InitDone => {
                self.items = self.building.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply(o) => {
                self.items.insert(key(&o), o);
                true
            }
            Event::Delete(o) => self.items.remove(&key(&o)).is_some(),
        }
    }

    /// The kind does not exist on this cluster (CRD not installed): empty, and listed.
    fn absent(&mut self) -> bool {
        let changed = !self.synced || !self.items.is_empty();
        self.items.clear();
        self.building = None;
        self.synced = true;
        changed
    }
}

/// Only what the agent reads is kept of a Pod (a cluster's pods can be many).
fn slim(mut pod: Pod) -> Pod {
    pod.metadata.managed_fields = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.clear();
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.volumes = None;
    }
    if let Some(st) = pod.status.as_mut() {
        st.container_statuses = None;
        st.init_container_statuses = None;
        st.ephemeral_container_statuses = None;
        st.conditions = None;
    }
    pod
}

/// Services and EndpointSlices without what the agent never reads (annotations can be large).
fn slim_meta<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

#[derive(Default)]
struct Caches {
    pods: Cache<Pod>,
    namespaces: Cache<Namespace>,
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
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

    /// The snapshot for the store, converted exactly as manifests are.
    fn objects(&self, root_ns: &str) -> Objects {
        let mut o = Objects::default();
        for ((ns, name), pod) in &self.pods.items {
            o.pods.insert((ns.clone(), name.clone()), pod.clone());
        }
        for ((_, name), ns) in &self.namespaces.items {
            o.namespaces.insert(name.clone(), ns.clone());
        }
        for (key, svc) in &self.services.items {
            match crate::services::service_record(svc) {
                Ok(Some(r)) => {
                    o.services.insert(key.clone(), Arc::new(r));
                }
                Ok(None) => {}
                Err(e) => warn!(service = %format!("{}/{}", key.0, key.1), "Service skipped: {e}"),
            }
        }
        for (key, slice) in &self.slices.items {
            match crate::services::slice_record(slice) {
                Ok(Some(r)) => {
                    o.endpoint_slices.insert(key.clone(), Arc::new(r));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(slice = %format!("{}/{}", key.0, key.1), "EndpointSlice skipped: {e}")
                }
            }
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
            Ok(ev) => Update::Pod(Box::new(slim_event(ev))),
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
            Ok(ev) => Update::Service(Box::new(ev.modify(slim_meta))),
            Err(e) => Update::Failed(Kind::Service, e),
        })
        .boxed();
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg())
        .default_backoff()
        .map(|r| match r {
            Ok(ev) => Update::Slice(ev.modify(slim_meta)),
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
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            u = updates.next() => match u {
                Some(u) => u,
                None => break,
            },
        };
        // Take everything already waiting, then publish once.
        let mut changed = apply(&mut caches, first, &mut failing);
        while let Some(Some(u)) = futures_util::FutureExt::now_or_never(updates.next()) {
            changed |= apply(&mut caches, u, &mut failing);
        }
        if changed && caches.synced() {
            let objects = caches.objects(&root_ns);
            info!(
                pods = objects.pods.len(),
                namespaces = objects.namespaces.len(),
                services = objects.services.len(),
                endpoint_slices = objects.endpoint_slices.len(),
                policies = objects.statuses.len(),
                "Kubernetes snapshot"
            );
            let statuses = objects.statuses.clone();
            store.set_source(Source::Kubernetes, objects);
            reported = crate::manifests::report_statuses(&statuses, &reported);
        }
    }
    annotator.abort();
}

/// Keeps only what the agent reads of each Pod event.
fn slim_event(ev: Event<Pod>) -> Event<Pod> {
    match ev {
        Event::Apply(p) => Event::Apply(slim(p)),
        Event::InitApply(p) => Event::InitApply(slim(p)),
        other => other,
    }
}

fn apply(caches: &mut Caches, u: Update, failing: &mut HashSet<Kind>) -> bool {
    let (kind, changed) = match u {
        Update::Pod(ev) => (Kind::Pod, caches.pods.apply(*ev)),
        Update::Namespace(ev) => (Kind::Namespace, caches.namespaces.apply(ev)),
        Update::Service(ev) => (Kind::Service, caches.services.apply(*ev)),
        Update::Slice(ev) => (Kind::EndpointSlice, caches.slices.apply(ev)),
        Update::Policy(k, ev) => (k, caches.policy_cache(k).apply(ev)),
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
                return caches.policy_cache(kind).absent();
            }
            if failing.insert(kind) {
                warn!(
                    ?kind,
                    "Kubernetes watch failed (retrying with back-off): {e}"
                );
            } else {
                debug!(?kind, "Kubernetes watch still failing: {e}");
            }
            return false;
        }
    };
    if failing.remove(&kind) {
        info!(?kind, "Kubernetes watch recovered");
    }
    changed
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
            let obj_uid = obj.metadata.uid.clone().unwrap_or_default();
            if !uid.is_empty() && !obj_uid.is_empty() && uid != obj_uid {
                continue; // The object is an older pod of that name.
            }
            let annotated = obj
                .annotations()
                .get(REDIRECTION_ANNOTATION)
                .is_some_and(|v| v == "enabled");
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

#[cfg(test)]
mod tests;
