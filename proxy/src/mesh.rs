//! What the data path needs to know about the mesh: who is at an address (the workload
//! store) and the certificates of this node's identities.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::authz::{Connection, Decision};
use crate::identity::Identity;
use crate::service::{Service, ServiceName};
use crate::tls::Certificates;

/// A workload as the data path sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Shared (as the `app` label): a connection puts them in its metric labels.
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub identity: Identity,
    /// Captured by an Ambit agent, so it serves HBONE on 15008.
    pub hbone: bool,
    /// The Pod's `app` label (metrics).
    pub app: Option<Arc<str>>,
}

/// The workload store, seen from the data path.
pub trait Directory: Send + Sync + 'static {
    /// The workload that owns `ip`, if the store knows one.
    fn by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>>;
    /// Is `ip` an address of a pod this agent captured (a pod of this node)?
    fn is_local(&self, ip: IpAddr) -> bool;
    /// The Service whose VIP (ClusterIP) is `ip`, if the store knows one.
    fn service(&self, ip: IpAddr) -> Option<Arc<Service>>;
    /// Is `ip` in the cluster's Service ranges (so, when [`Directory::service`] does not know
    /// it, a Service the store has not learnt yet rather than a destination outside)?
    fn in_service_range(&self, ip: IpAddr) -> bool;
    /// A Service that has `addr` (an endpoint address and target port) as an endpoint, for
    /// telemetry on the destination side, which never sees the VIP the client called
    /// (the first by namespace and name when several do).
    fn service_of_endpoint(&self, addr: SocketAddr) -> Option<Arc<ServiceName>>;
    /// The current identity of a pod of this node (service account `default` while its Pod
    /// object is unknown).
    fn identity_of(&self, namespace: &str, name: &str) -> Identity;
    /// The authorization decision for a connection to the pod `namespace/name` of this node.
    fn authorize(&self, namespace: &str, name: &str, conn: &Connection) -> Decision;
    /// Changes whenever policies change; open connections are then re-evaluated.
    fn policy_updates(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// HBONE tuning; the defaults are ztunnel's where it has one.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Streams carried by one pooled connection before another is opened.
    pub max_streams_per_connection: usize,
    /// A pooled connection with no stream for this long is closed.
    pub pool_idle_timeout: Duration,
    /// Idle connections to a destination beyond the first close after this (at most
    /// `pool_idle_timeout`): a burst that needed several connections does not keep them all.
    /// Each holds what its busiest moment grew (h2 keeps its frame and stream tables at
    /// their peak size while the connection lives).
    pub pool_surplus_idle_timeout: Duration,
    /// TCP connect plus TLS and HTTP/2 handshakes, and the CONNECT response.
    pub connect_timeout: Duration,
    /// An inbound HBONE connection without streams for this long is closed (GOAWAY). Longer
    /// than clients' pool idle timeout, so a client normally closes first.
    pub inbound_idle_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Bytes per direction buffered between a TCP socket and an HBONE stream: the largest
    /// read, and so the largest DATA frame, of a bulk transfer (a connection starts at 4 KiB).
    /// 128 KiB against 64 KiB (bench, same run, 2026-12-04): context switches per GB 0.58x
    /// across nodes and 0.74x on one node with everything on one vCPU, throughput unchanged;
    /// 256 KiB had cost 0.72x of one stream's throughput on one node.
    pub copy_buffer: usize,
    /// Data h2 queues per stream beyond what the connection's socket has taken: the socket's
    /// own send buffer is what keeps a stream moving, so more only multiplies the agent's
    /// memory by the number of busy streams (measured: 4 MiB, 1 MiB and 128 KiB move one
    /// stream equally fast).
    pub stream_send_buffer: usize,
    /// `SO_RCVBUF` of the sockets facing an app in its own pod (accepted on 15001, connected
    /// to the app for inbound traffic); 0 leaves the kernel's autotuning. See
    /// [`crate::socket::limit_receive_buffer`].
    pub app_receive_buffer: usize,
    /// Congestion control of the same sockets (`TCP_CONGESTION`); `None` keeps the pod
    /// namespace's default. See [`crate::socket::set_congestion_control`].
    pub app_congestion_control: Option<String>,
    /// Congestion control of the HBONE sockets, both ends (`None`: the pod namespace's, the
    /// default); an operator's choice for the network between pods.
    pub hbone_congestion_control: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            pool_idle_timeout: Duration::from_secs(300),
            pool_surplus_idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            inbound_idle_timeout: Duration::from_secs(600),
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            copy_buffer: 128 << 10,
            stream_send_buffer: 128 << 10,
            app_receive_buffer: 256 << 10,
            app_congestion_control: None,
            hbone_congestion_control: None,
        }
    }
}

/// Everything a pod proxy shares with the rest of the node.
pub struct Mesh {
    pub directory: Arc<dyn Directory>,
    pub certs: Arc<dyn Certificates>,
    pub trust_domain: String,
    pub settings: Settings,
    pub metrics: Arc<crate::metrics::ProxyMetrics>,
    /// Where accepted connections run.
    pub workers: crate::workers::Workers,
    /// The same-node shortcut for HBONE connections between pods of this node
    /// ([`ambit_common::sockmap`]); `None` when off or unavailable.
    pub shortcut: Option<ambit_common::sockmap::Redirect>,
}
