//! What a pod's listeners and connections share: the pod's facts, its HBONE client pool, the
//! admitted inbound connections (re-evaluated when policies change), and the signals that
//! stop it. A leaf of the pod's modules: [`crate::pod`] creates it, the listeners
//! ([`crate::passthrough`], [`crate::hbone::server`]) use it.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::authz::{Connection, Decision};
use crate::hbone;
use crate::identity::Identity;
use crate::mesh::Mesh;
use crate::metrics::{Peer, PodSeries, Text, UNKNOWN};
use crate::socket::SocketFactory;

/// Ports that must never be a forwarding destination (loop protection).
pub const RESERVED_PORTS: [u16; 3] = [
    ambit_common::OUTBOUND_PORT,
    ambit_common::INBOUND_PLAINTEXT_PORT,
    ambit_common::INBOUND_HBONE_PORT,
];

/// Why a connection relayed when its pod's proxy stopped (drain deadline, pod released) ended:
/// both sides see a reset, never an orderly close that could pass for a complete reply.
pub fn stopped() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "closed: the pod's proxy stopped",
    )
}

/// Facts a listener needs about its pod.
#[derive(Clone, Debug)]
pub struct PodContext {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
}

/// State shared by a pod's listeners and connections.
pub struct PodShared {
    pub ctx: PodContext,
    /// `ctx`'s name and namespace, shared with every connection's metric labels.
    name: Arc<str>,
    namespace: Arc<str>,
    /// The `baggage` header of this pod's outbound CONNECTs (Istio's: the source pod's
    /// namespace and name), made once; `None` if the names make no valid header value.
    pub baggage: Option<http::HeaderValue>,
    pub factory: Arc<dyn SocketFactory>,
    pub mesh: Arc<Mesh>,
    pub pool: hbone::client::Pool,
    /// Admitted inbound connections, re-evaluated when policies change.
    live: Mutex<HashMap<u64, (Connection, CancellationToken)>>,
    next_id: AtomicU64,
    /// Metric series this pod reported; removed with the pod.
    pub series: Mutex<PodSeries>,
    /// Fires when the listeners must stop accepting (drain); connections go on.
    pub accepting: CancellationToken,
    /// Fires when the pod is released: everything stops.
    pub stopped: CancellationToken,
    active: Arc<AtomicUsize>,
    /// Inbound HBONE connections open now, streams or not (see [`PodShared::hbone_guard`]).
    hbone: Arc<AtomicUsize>,
}

/// Counts one proxied connection (or HBONE stream, or inbound HBONE connection) while alive.
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An inbound connection the policy allowed; `revoked` fires if a later policy denies it.
/// Dropping it unregisters the connection.
pub struct Admitted {
    pod: Arc<PodShared>,
    id: u64,
    pub revoked: CancellationToken,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.pod.live_conns().remove(&self.id);
    }
}

impl PodShared {
    /// The shared state of a pod whose proxy stops when `stop` fires.
    pub fn new(
        ctx: PodContext,
        factory: Arc<dyn SocketFactory>,
        mesh: Arc<Mesh>,
        stop: &CancellationToken,
    ) -> Self {
        Self {
            baggage: http::HeaderValue::try_from(format!(
                "k8s.namespace.name={},k8s.pod.name={}",
                ctx.namespace, ctx.name
            ))
            .ok(),
            name: ctx.name.as_str().into(),
            namespace: ctx.namespace.as_str().into(),
            ctx,
            pool: hbone::client::Pool::new(factory.clone(), mesh.clone()),
            factory,
            mesh,
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            series: Mutex::new(PodSeries::default()),
            accepting: stop.child_token(),
            stopped: stop.clone(),
            active: Default::default(),
            hbone: Default::default(),
        }
    }

    /// An unconnected socket to `dst`, an app of this pod (with `source` as its transparent
    /// source address, see [`SocketFactory::upstream`]): its receive buffer and congestion
    /// control are the app-facing ones.
    pub fn socket_to_app(
        &self,
        dst: std::net::SocketAddr,
        source: Option<std::net::SocketAddr>,
    ) -> io::Result<tokio::net::TcpSocket> {
        let s = self.factory.upstream(dst, source)?;
        let settings = &self.mesh.settings;
        crate::socket::limit_receive_buffer((&s).into(), settings.app_receive_buffer)?;
        crate::socket::set_congestion_control(
            (&s).into(),
            settings.app_congestion_control.as_deref(),
        );
        Ok(s)
    }

    /// Marks a connection active until the guard drops.
    pub fn active_guard(&self) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.active.clone())
    }

    /// Proxied connections and inbound HBONE streams open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Marks an inbound HBONE connection open until the guard drops: from its accept, through
    /// the handshakes and the GOAWAY exchange of a drain, to its close. A drain waits for these
    /// too: a connection without a stream may still carry a CONNECT its client sent before it
    /// read the GOAWAY, and closing it under that stream would fail the client's app instead of
    /// serving the stream or refusing it in a way the client retries.
    pub fn hbone_guard(&self) -> ActiveGuard {
        self.hbone.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.hbone.clone())
    }

    /// Inbound HBONE connections open now.
    pub fn hbone_connections(&self) -> usize {
        self.hbone.load(Ordering::Acquire)
    }

    /// Stops accepting new connections; open ones continue (HBONE peers get GOAWAY).
    pub fn stop_accepting(&self) {
        self.accepting.cancel();
    }

    fn live_conns(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (Connection, CancellationToken)>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decide(&self, conn: &Connection) -> Decision {
        self.mesh
            .directory
            .authorize(&self.ctx.namespace, &self.ctx.name, conn)
    }

    /// This pod, as metric labels describe it.
    pub fn me(&self) -> Peer {
        self.me_as(&self.identity())
    }

    /// This pod, as metric labels describe it, with its identity already looked up.
    pub fn me_as(&self, identity: &Identity) -> Peer {
        let app = self
            .ctx
            .ips
            .first()
            .and_then(|ip| self.mesh.directory.by_ip(*ip))
            .and_then(|w| w.app.clone());
        Peer {
            workload: (&self.name).into(),
            namespace: (&self.namespace).into(),
            principal: identity.uri().into(),
            app: app.map_or(UNKNOWN.into(), Text::Shared),
        }
    }

    /// The other end of a connection, from the workload store (and its verified identity).
    pub fn peer(&self, ip: std::net::IpAddr, identity: Option<&Identity>) -> Peer {
        let mut p = match self.mesh.directory.by_ip(ip) {
            Some(w) => Peer {
                workload: (&w.name).into(),
                namespace: (&w.namespace).into(),
                principal: UNKNOWN.into(),
                app: w.app.as_ref().map_or(UNKNOWN.into(), Text::from),
            },
            None => Peer::unknown(),
        };
        if let Some(id) = identity {
            p.principal = id.uri().into();
        }
        p
    }

    /// Authorizes a new inbound connection (`via`: "hbone" or "plaintext"); every decision is
    /// logged and counted.
    pub fn admit(self: &Arc<Self>, conn: Connection, via: &str) -> Result<Admitted, Decision> {
        let decision = self.decide(&conn);
        let src_id = conn
            .src_identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        if let Decision::Deny(why) = &decision {
            self.mesh.metrics.decision(false);
            tracing::info!(target: "authz", pod = %self.ctx.name, namespace = %self.ctx.namespace,
                via, src.identity = %src_id, src.ip = %conn.src_ip, dst.ip = %conn.dst_ip,
                dst.port = conn.dst_port, reason = %why, "connection denied");
            return Err(decision);
        }
        self.mesh.metrics.decision(true);
        tracing::debug!(target: "authz", pod = %self.ctx.name, namespace = %self.ctx.namespace,
            via, src.identity = %src_id, src.ip = %conn.src_ip, dst.port = conn.dst_port,
            "connection allowed");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        self.live_conns().insert(id, (conn, revoked.clone()));
        Ok(Admitted {
            pod: self.clone(),
            id,
            revoked,
        })
    }

    /// Re-evaluates every admitted connection; closes those now denied. Returns how many.
    pub fn reevaluate(&self) -> usize {
        let live: Vec<(Connection, CancellationToken)> =
            self.live_conns().values().cloned().collect();
        let mut cut = 0;
        for (conn, token) in live {
            if let Decision::Deny(why) = self.decide(&conn) {
                token.cancel();
                cut += 1;
                self.mesh.metrics.authz_revoked.inc();
                tracing::info!(target: "authz", pod = %self.ctx.name, namespace = %self.ctx.namespace,
                    src.ip = %conn.src_ip, dst.port = conn.dst_port, reason = %why,
                    "open connection closed: a policy change denies it");
            }
        }
        cut
    }

    /// The pod's identity now (its Pod object may arrive after the CNI ADD).
    pub fn identity(&self) -> Identity {
        self.mesh
            .directory
            .identity_of(&self.ctx.namespace, &self.ctx.name)
    }
}
