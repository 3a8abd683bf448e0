//! Captured pods and their proxies.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ambit_common::netns::{Netns, NetnsId};
use ambit_common::protocol::PodInfo;
use ambit_common::redirect::{AgentCgroup, RuleSet};
use ambit_proxy::context::PodContext;
use ambit_proxy::mesh::Mesh;
use ambit_proxy::pod::PodProxy;
use tracing::{info, warn};

use crate::metrics::AgentMetrics;
use crate::sockets::InPodSockets;
use crate::state::{PodRecord, STATE_VERSION, StateDir};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the listeners of {pod} in {netns}: {source}")]
    Listen {
        pod: String,
        netns: NetnsId,
        source: std::io::Error,
    },
    #[error("cannot install the agent's rules for {pod} in {netns}: {reason}")]
    Rules {
        pod: String,
        netns: NetnsId,
        reason: String,
    },
    #[error(transparent)]
    State(#[from] crate::state::Error),
}

struct Entry {
    pod: PodInfo,
    netns: NetnsId,
    proxy: PodProxy,
}

/// What a restart found in the state directory.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    pub adopted: usize,
    pub gone: usize,
    pub failed: usize,
}

/// What a drain left open at its deadline (and then cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Proxied connections and inbound HBONE streams.
    pub cut: usize,
    /// Inbound HBONE connections whose client had not finished the GOAWAY exchange.
    pub hbone_cut: usize,
}

pub struct Manager {
    pods: Mutex<HashMap<String, Entry>>,
    state: StateDir,
    /// This agent's cgroup: its exemption table goes into every pod before the listeners bind.
    exemption: AgentCgroup,
    ready: AtomicBool,
    mesh: Arc<Mesh>,
    store: Arc<Store>,
    pub metrics: Arc<AgentMetrics>,
    /// Recorded pods whose listeners could not be restored; retried by [`Manager::reconcile`].
    unserved: Mutex<HashMap<String, (PodRecord, String)>>,
    /// Served pods whose rules could not be reinstalled: label → error.
    unprotected: Mutex<HashMap<String, String>>,
}

fn label(p: &PodInfo) -> String {
    format!("{}/{} ({})", p.namespace, p.name, p.container_id)
}

impl Manager {
    pub fn new(
        state: StateDir,
        exemption: AgentCgroup,
        mesh: Arc<Mesh>,
        store: Arc<Store>,
        metrics: Arc<AgentMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pods: Mutex::new(HashMap::new()),
            state,
            exemption,
            ready: AtomicBool::new(false),
            mesh,
            store,
            metrics,
            unserved: Mutex::new(HashMap::new()),
            unprotected: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Captures a pod: binds its listeners inside `netns`, records it, then returns (the
    /// caller acks the plugin). Idempotent for the same namespace; a new namespace for the same
    /// container id replaces the old proxy. Must run inside the tokio runtime.
    pub fn add(&self, pod: PodInfo, netns: Netns) -> Result<(), Error> {
        let id = netns.id();
        let mut pods = self.lock();
        if let Some(e) = pods.get_mut(&pod.container_id)
            && e.netns == id
        {
            e.pod = pod.clone();
            self.store.pod_added(&pod);
            self.state.save(&PodRecord {
                version: STATE_VERSION,
                pod,
                netns: id,
            })?;
            return Ok(());
        }
        // A replaced entry must release its ports before the new listeners bind.
        pods.remove(&pod.container_id);
        // The agent's sockets must skip the redirect before the first one is opened; a table
        // from an older version is brought up to this one's first (repair is quiet here).
        match protect_tables(&netns, pod.rules.as_ref(), &self.exemption) {
            Ok(true) => info!(pod = %label(&pod), netns = %id, "pod rules brought up to date"),
            Ok(false) => {}
            Err(reason) => {
                return Err(Error::Rules {
                    pod: label(&pod),
                    netns: id,
                    reason,
                });
            }
        }
        let ctx = PodContext {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            ips: pod.ips.clone(),
        };
        let factory = Arc::new(InPodSockets {
            netns: Arc::new(netns),
        });
        let proxy =
            PodProxy::start(factory, ctx, self.mesh.clone()).map_err(|source| Error::Listen {
                pod: label(&pod),
                netns: id,
                source,
            })?;
        self.state.save(&PodRecord {
            version: STATE_VERSION,
            pod: pod.clone(),
            netns: id,
        })?;
        self.store.pod_added(&pod);
        self.metrics.pods_captured.set(pods.len() as i64 + 1);
        // The pod's certificate is issued before the plugin is acknowledged, so the first
        // connection never waits for it (and readiness counts it as loaded).
        let identity = self.store.identity_of_pod(&pod);
        if let Err(e) = self.mesh.certs.certified_key(&identity) {
            warn!(pod = %label(&pod), %identity, "no certificate for the pod yet: {e}");
        }
        info!(pod = %label(&pod), netns = %id, ips = ?pod.ips,
            identity = %self.store.identity_of_pod(&pod), "pod captured");
        pods.insert(
            pod.container_id.clone(),
            Entry {
                pod,
                netns: id,
                proxy,
            },
        );
        Ok(())
    }

    /// Forgets a pod: closes its listeners and connections and drops its record. Idempotent.
    pub fn del(&self, container_id: &str) -> bool {
        let removed = self.lock().remove(container_id);
        self.state.remove(container_id);
        self.store.pod_removed(container_id);
        self.unserved_lock().remove(container_id);
        if let Some(e) = &removed {
            info!(pod = %label(&e.pod), "pod released");
        }
        self.update_gauges();
        removed.is_some()
    }

    /// Ok when the pod is served from listeners in the namespace its path still names.
    pub fn check(&self, container_id: &str) -> Result<(), String> {
        let pods = self.lock();
        let e = pods
            .get(container_id)
            .ok_or_else(|| format!("pod {container_id} is not captured by this agent"))?;
        match Netns::open(&e.pod.netns_path) {
            Ok(ns) if ns.id() == e.netns => Ok(()),
            Ok(ns) => Err(format!(
                "{} now names namespace {}, but the pod was captured in {}",
                e.pod.netns_path.display(),
                ns.id(),
                e.netns
            )),
            Err(err) => Err(format!("the pod's namespace is gone: {err}")),
        }
    }

    /// Forgets every pod not in `valid`; returns the container ids removed.
    pub fn gc(&self, valid: &[String]) -> Vec<String> {
        let stale: Vec<String> = self
            .lock()
            .keys()
            .filter(|k| !valid.contains(k))
            .cloned()
            .collect();
        for id in &stale {
            self.del(id);
        }
        stale
    }

    /// Re-adopts the pods of the state directory after a restart: each namespace is reopened
    /// by path and must still be the one recorded; pods whose namespace is gone are forgotten.
    pub fn adopt(&self) -> Result<Adoption, Error> {
        let mut summary = Adoption::default();
        for rec in self.state.load()? {
            let ns = match Netns::open(&rec.pod.netns_path) {
                Ok(ns) if ns.id() == rec.netns => ns,
                _ => {
                    info!(pod = %label(&rec.pod), "pod gone while the agent was away; forgotten");
                    self.state.remove(&rec.pod.container_id);
                    summary.gone += 1;
                    continue;
                }
            };
            let l = label(&rec.pod);
            match self.add(rec.pod.clone(), ns) {
                Ok(()) => summary.adopted += 1,
                Err(e) => {
                    warn!(pod = %l, "cannot re-adopt pod, it is UNPROTECTED until this is fixed: {e}");
                    self.unserved_lock()
                        .insert(rec.pod.container_id.clone(), (rec, e.to_string()));
                    summary.failed += 1;
                }
            }
        }
        self.ready.store(true, Ordering::SeqCst);
        self.update_gauges();
        Ok(summary)
    }

    fn unserved_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PodRecord, String)>> {
        self.unserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_gauges(&self) {
        self.metrics.pods_captured.set(self.len() as i64);
        self.metrics
            .pods_unserved
            .set(self.unserved_lock().len() as i64);
    }

    /// Retries pods whose listeners could not be restored; returns how many are served now.
    fn retry_unserved(&self) -> usize {
        let pending: Vec<PodRecord> = self
            .unserved_lock()
            .values()
            .map(|(r, _)| r.clone())
            .collect();
        let mut fixed = 0;
        for rec in pending {
            let id = rec.pod.container_id.clone();
            match Netns::open(&rec.pod.netns_path) {
                Ok(ns) if ns.id() == rec.netns => match self.add(rec.pod.clone(), ns) {
                    Ok(()) => {
                        info!(pod = %label(&rec.pod), "pod served again");
                        self.unserved_lock().remove(&id);
                        fixed += 1;
                    }
                    Err(e) => {
                        if let Some(entry) = self.unserved_lock().get_mut(&id) {
                            entry.1 = e.to_string();
                        }
                    }
                },
                _ => {
                    info!(pod = %label(&rec.pod), "unserved pod is gone; forgotten");
                    self.state.remove(&id);
                    self.unserved_lock().remove(&id);
                }
            }
        }
        fixed
    }

    /// Ready when the state directory was re-adopted and every known pod is served; the
    /// reasons otherwise.
    /// The workload store this manager feeds.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if !self.ready() {
            why.push("re-adopting pods after a restart".to_owned());
        }
        let pending = self.store.pending_sources();
        if !pending.is_empty() {
            why.push(format!(
                "waiting for the first snapshot from {pending:?}; inbound connections are refused until policies are known"
            ));
        }
        for (rec, err) in self.unserved_lock().values() {
            why.push(format!("pod {} is not served: {err}", label(&rec.pod)));
        }
        for (pod, err) in self
            .unprotected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            why.push(format!(
                "pod {pod} is UNPROTECTED: its redirect rules cannot be restored: {err}"
            ));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }

    /// Checks every served pod's redirect rules and policy routing inside its namespace and
    /// reinstalls what is missing or altered; a pod whose rules cannot be restored is reported
    /// as unprotected (log, readiness, metric). Netlink work: call it off the runtime threads.
    /// Returns (checked, repaired).
    pub fn verify_rules(&self) -> (usize, usize) {
        let pods: Vec<(PodInfo, NetnsId)> = self
            .lock()
            .values()
            .map(|e| (e.pod.clone(), e.netns))
            .collect();
        let (mut checked, mut repaired) = (0, 0);
        let mut unprotected = HashMap::new();
        for (pod, id) in pods {
            let ns = match Netns::open(&pod.netns_path) {
                Ok(ns) if ns.id() == id => ns,
                _ => continue, // gone: reconcile forgets it
            };
            checked += 1;
            // Ours are repaired even when a foreign chain makes the pod unprotected.
            let outcome = protect(&ns, pod.rules.as_ref(), &self.exemption);
            let outcome = outcome.and_then(|r| foreign_chains(&ns).map(|()| r));
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    repaired += 1;
                    self.metrics.rules_repaired.inc();
                    warn!(pod = %label(&pod), netns = %id,
                        "redirect rules or routes were missing or altered: reinstalled");
                }
                Err(e) => {
                    tracing::error!(pod = %label(&pod), netns = %id,
                        "pod UNPROTECTED: its redirect rules are missing and cannot be reinstalled: {e}");
                    unprotected.insert(label(&pod), e);
                }
            }
        }
        self.metrics.pods_unprotected.set(unprotected.len() as i64);
        *self.unprotected.lock().unwrap_or_else(|p| p.into_inner()) = unprotected;
        (checked, repaired)
    }

    /// Captured pods for the admin view.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = self
            .lock()
            .values()
            .map(|e| {
                serde_json::json!({
                    "containerId": e.pod.container_id,
                    "namespace": e.pod.namespace,
                    "name": e.pod.name,
                    "ips": e.pod.ips,
                    "netns": e.netns.to_string(),
                    "netnsPath": e.pod.netns_path,
                    "identity": self.store.identity_of_pod(&e.pod).to_string(),
                    "state": "served",
                    "pooledHboneConnections": e.proxy.pooled_connections(),
                })
            })
            .collect();
        for (rec, err) in self.unserved_lock().values() {
            v.push(serde_json::json!({
                "containerId": rec.pod.container_id,
                "namespace": rec.pod.namespace,
                "name": rec.pod.name,
                "ips": rec.pod.ips,
                "state": "unserved",
                "error": err,
            }));
        }
        v
    }

    /// Removes this agent's exemption table from every pod it serves (on a clean exit, after
    /// the drain: a successor agent has its own). Best effort; returns how many were removed.
    pub fn remove_exemptions(&self) -> usize {
        use ambit_common::nft::NftSocket;
        let pods: Vec<PodInfo> = self.lock().values().map(|e| e.pod.clone()).collect();
        pods.iter()
            .filter(|p| {
                Netns::open(&p.netns_path)
                    .ok()
                    .and_then(|ns| ns.run(NftSocket::open).ok())
                    .and_then(Result::ok)
                    .is_some_and(|sock| self.exemption.remove(&sock).is_ok())
            })
            .count()
    }

    /// Stops accepting on every pod's listeners, waits up to `deadline` for open connections
    /// to finish — proxied connections, and inbound HBONE connections until their GOAWAY
    /// exchange ends them — then cuts the rest (with a reset).
    pub async fn drain(&self, deadline: std::time::Duration) -> Drained {
        let proxies: Vec<Arc<ambit_proxy::context::PodShared>> =
            self.lock().values().map(|e| e.proxy.shared()).collect();
        for p in &proxies {
            p.stop_accepting();
        }
        let open = || proxies.iter().map(|p| p.active()).sum::<usize>();
        let hbone = || proxies.iter().map(|p| p.hbone_connections()).sum::<usize>();
        let start = std::time::Instant::now();
        while open() + hbone() > 0 && start.elapsed() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let drained = Drained {
            cut: open(),
            hbone_cut: hbone(),
        };
        // What is left is cut with a reset on both sides (an orderly close could pass for a
        // complete reply). The connections' tasks do it; they get a moment to run.
        for p in &proxies {
            p.stopped.cancel();
        }
        let cutting = std::time::Instant::now();
        while open() + hbone() > 0 && cutting.elapsed() < std::time::Duration::from_secs(1) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drained
    }

    /// Forgets pods whose namespace has disappeared (their DEL never reached us).
    pub fn reconcile(&self) -> usize {
        let gone: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| !still_there(&e.pod.netns_path, e.netns))
            .map(|(k, _)| k.clone())
            .collect();
        for id in &gone {
            info!(container_id = %id, "namespace gone without DEL; pod forgotten");
            self.del(id);
        }
        self.retry_unserved();
        self.update_gauges();
        gone.len()
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn still_there(path: &Path, id: NetnsId) -> bool {
    Netns::open(path).is_ok_and(|ns| ns.id() == id)
}

/// Verifies the pod's redirect table (when its settings are known), this agent's exemption
/// table and the policy routing; reinstalls what is missing or altered. Ok(true) when
/// something was reinstalled. Blocking (rtnetlink runs its own runtime): not on a runtime
/// thread.
fn protect(ns: &Netns, rules: Option<&RuleSet>, exemption: &AgentCgroup) -> Result<bool, String> {
    use ambit_common::route::RouteCtl;
    let mut repaired = protect_tables(ns, rules, exemption)?;
    let routes = RouteCtl::open_in(ns).map_err(|e| e.to_string())?;
    if routes.verify().is_err() {
        routes.install().map_err(|e| e.to_string())?;
        routes.verify().map_err(|e| e.to_string())?;
        repaired = true;
    }
    Ok(repaired)
}

/// The nftables part of [`protect`] (plain netlink, fine on any thread): what must be right
/// before the agent opens its first socket in the pod.
fn protect_tables(
    ns: &Netns,
    rules: Option<&RuleSet>,
    exemption: &AgentCgroup,
) -> Result<bool, String> {
    use ambit_common::nft::NftSocket;
    let sock = ns
        .run(NftSocket::open)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut repaired = false;
    if let Some(rules) = rules
        && rules.verify(&sock).is_err()
    {
        rules.install(&sock).map_err(|e| e.to_string())?;
        rules.verify(&sock).map_err(|e| e.to_string())?;
        repaired = true;
    }
    if exemption.verify(&sock).is_err() {
        exemption.install(&sock).map_err(|e| {
            format!(
                "{e} (the exemption matches the agent's sockets by cgroup v2: the kernel needs nftables' socket expression with cgroupv2, Linux 6.1+)"
            )
        })?;
        exemption.verify(&sock).map_err(|e| e.to_string())?;
        repaired = true;
    }
    Ok(repaired)
}

/// A foreign base chain that runs before the capture decision cannot be repaired away (the
/// agent does not delete what it did not install): the pod is reported unprotected.
fn foreign_chains(ns: &Netns) -> Result<(), String> {
    use ambit_common::nft::NftSocket;
    let sock = ns
        .run(NftSocket::open)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    ambit_common::redirect::no_foreign_chains(&sock).map_err(|e| e.to_string())
}
