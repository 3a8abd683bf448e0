//! Ambit's per-pod data path.
//!
//! The proxy never switches namespaces itself: it asks a [`socket::SocketFactory`] for
//! listeners and upstream sockets, and the node agent's factory creates them inside the pod's
//! network namespace (so outbound connections carry the pod's own IP).
//!
//! Layout:
//! - [`socket`]: the factory trait, socket options, original-destination lookup.
//! - [`passthrough`]: 15001 outbound and 15006 inbound plaintext forwarding.
//! - [`pod`]: starts and stops the set of listeners of one pod; [`context`]: what they share.
//! - [`access`]: one record per connection, its metrics and its access-log line.
//! - [`cancel`]: waiting for a cancellation beside a relay.
//! - [`hbone`]: HTTP/2 CONNECT over mutual TLS 1.3 (client pool, 15008 server).
//! - [`identity`], [`tls`]: SPIFFE identities and the rustls configurations that check them.
//! - [`mesh`]: what the data path asks of the node (workload store, certificates).
//! - [`service`]: Services by VIP and the choice of an endpoint.
//! - [`workers`]: the threads connections run on (one connection, one thread).

#![forbid(unsafe_code)]

pub mod access;
pub mod authz;
pub mod cancel;
pub mod context;
pub mod hbone;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod passthrough;
pub mod pod;
pub mod service;
pub mod socket;
pub mod tls;
pub mod workers;
