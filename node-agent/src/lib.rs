//! `ambit-agent`: the node agent.
//!
//! Layout:
//! - [`config`]: command line / environment, parsed then validated.
//! - [`cni_server`]: the plugin's Unix socket (peer-credential check, framing, SCM_RIGHTS).
//! - [`workloads`]: captured pods and their proxies; add, delete, check, GC, reconcile.
//! - [`state`]: the on-disk record of captured pods, for re-adoption after a restart.
//! - [`cgroup`]: the agent's own cgroup v2, by which the pods' rules recognise its sockets.
//! - [`sockets`]: the `SocketFactory` that creates every pod socket inside the pod's netns.
//! - [`store`], [`manifests`]: the workload store (Kubernetes objects) and its manifests source;
//!   [`records`]: the compact records of Pods and Namespaces it keeps.
//! - [`services`]: Services and EndpointSlices as compact records, indexed by VIP.
//! - [`policy`]: AuthorizationPolicy / PeerAuthentication validation and compilation.
//! - [`ca`], [`certs`]: the CA (embedded or plug-in) and the per-identity certificates.

#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod certs;
pub mod cgroup;
pub mod claims;
pub mod cni_server;
pub mod config;
pub mod k8s;
pub mod log;
pub mod manifests;
pub mod metrics;
pub mod policy;
pub mod records;
pub mod services;
pub mod sockets;
pub mod state;
pub mod store;
pub mod workloads;
