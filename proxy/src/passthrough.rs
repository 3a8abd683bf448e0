//! The 15001 and 15006 listeners. Outbound (15001): a Service VIP is first resolved to one of
//! the Service's endpoints ([`crate::service`]); a destination the workload store knows as a
//! captured workload goes through HBONE; anything else is forwarded as is (to the chosen
//! endpoint, for a Service). Inbound plaintext (15006): forwarded to the app, keeping the
//! client's source address, when it was addressed to one of the pod's own IPs (reset
//! otherwise).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::hbone;
use crate::mesh::Workload;
use crate::metrics::{ConnRecord, TrafficLabels};
use crate::pod::PodShared;
use crate::service::{NoEndpoint, ServiceName};
use crate::socket::{canonical, original_dst};

/// Ports that must never be a forwarding destination (loop protection).
pub const RESERVED_PORTS: [u16; 3] = [
    ambit_common::OUTBOUND_PORT,
    ambit_common::INBOUND_PLAINTEXT_PORT,
    ambit_common::INBOUND_HBONE_PORT,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Facts a listener needs about its pod.
#[derive(Clone, Debug)]
pub struct PodContext {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
}

/// Accepts until `stop` fires; every connection runs in its own task, also bound to `stop`.
pub async fn serve(
    dir: Direction,
    listener: TcpListener,
    pod: Arc<PodShared>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = pod.accepting.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(pod = %pod.ctx.name, dir = dir.as_str(), "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (pod, stop) = (pod.clone(), stop.clone());
        let active = pod.active_guard();
        tokio::spawn(async move {
            let _active = active;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = forward(dir, stream, canonical(peer), pod) => {}
            }
        });
    }
}

async fn forward(dir: Direction, mut client: TcpStream, peer: SocketAddr, shared: Arc<PodShared>) {
    let pod = &shared.ctx;
    let start = Instant::now();
    let dst = match original_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            debug!(%peer, dir = dir.as_str(), "no original destination ({e}); closing");
            return;
        }
    };
    if RESERVED_PORTS.contains(&dst.port()) {
        debug!(%peer, %dst, "destination is a reserved Ambit port; closing");
        return;
    }
    // Inbound plaintext is served for this pod's own addresses only: a neighbour that routes a
    // packet for any other destination to the pod (the redirect takes it whatever its
    // address) must not get the agent to connect there on its behalf.
    if dir == Direction::Inbound
        && !pod
            .ips
            .iter()
            .any(|ip| ip.to_canonical() == dst.ip().to_canonical())
    {
        info!(target: "access", direction = "inbound", protocol = "tcp", src.addr = %peer,
            dst.addr = %dst, pod = %pod.name, namespace = %pod.namespace,
            error = "the destination is not an address of this pod", "connection refused");
        hbone::abort(&client);
        return;
    }
    // Outbound, where the connection goes: a Service VIP is resolved to one of its endpoints
    // (the node's kube-proxy would have done it after the packet left the pod, too late to
    // encrypt); anything else goes where the app sent it.
    let mut target = dst;
    let mut service = None;
    if dir == Direction::Outbound {
        if let Some(svc) = shared.mesh.directory.service(dst.ip()) {
            match svc.pick(dst, peer.ip()) {
                Ok(ep) => target = ep.addr,
                Err(e) => {
                    return refuse_no_endpoint(client, peer, dst, Some(&svc.name), e, &shared);
                }
            }
            service = Some(svc.name.clone());
        } else if shared.mesh.directory.in_service_range(dst.ip()) {
            let why = NoEndpoint::UnknownService { vip: dst };
            return refuse_no_endpoint(client, peer, dst, None, why, &shared);
        }
        if let Some(w) = shared.mesh.directory.by_ip(target.ip())
            && w.hbone
        {
            let route = Route {
                peer,
                dst,
                target,
                service: service.as_deref(),
            };
            return outbound_hbone(client, route, &w, &shared, start).await;
        }
    } else {
        // Inbound the VIP is not known; name a Service this port is an endpoint of.
        service = shared.mesh.directory.service_of_endpoint(dst);
    }
    let service = service.as_deref();
    // Outbound to a Service, what the app called (`dst`) is the VIP; `target` the endpoint.
    let vip = (dir == Direction::Outbound && service.is_some()).then_some(dst);
    let (reporter, src, dst_peer) = match dir {
        Direction::Inbound => ("destination", shared.peer(peer.ip(), None), shared.me()),
        Direction::Outbound => ("source", shared.me(), shared.peer(target.ip(), None)),
    };
    let labels = |flags: &str| {
        TrafficLabels::new(reporter, &src, &dst_peer, false, flags).with_service(service)
    };
    let metrics = &shared.mesh.metrics;
    let admitted = if dir == Direction::Inbound {
        let conn = crate::authz::Connection {
            src_identity: None,
            src_ip: peer.ip(),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        };
        match shared.admit(conn, "plaintext") {
            Ok(a) => Some(a),
            // Reset without contacting the app (always a reset, whether or not the client's
            // first bytes have arrived yet).
            Err(_) => {
                ConnRecord::open(metrics, labels("DENY"), &shared.series).close(0, 0);
                hbone::abort(&client);
                return;
            }
        }
    } else {
        None
    };
    // Inbound: connect to the app from the client's own address, unless the client is the pod
    // itself (then the ordinary local address is already right).
    let source = match dir {
        Direction::Inbound if !pod.ips.contains(&peer.ip()) && !peer.ip().is_loopback() => {
            Some(peer.ip())
        }
        _ => None,
    };
    // Inbound, the destination is an app of this pod; outbound, anything beyond it.
    let socket = match dir {
        Direction::Inbound => shared.socket_to_app(dst, source),
        Direction::Outbound => shared.factory.upstream(target, source),
    };
    let upstream = match socket {
        Ok(s) => s.connect(target).await,
        Err(e) => Err(e),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            ConnRecord::open(metrics, labels("CONNECT"), &shared.series).close(0, 0);
            info!(target: "access", direction = dir.as_str(), protocol = "tcp", src.addr = %peer, dst.addr = %target,
                dst.service = service.map(|s| s.hostname.as_str()), dst.vip = vip.map(tracing::field::display),
                src.workload = %src.workload, dst.workload = %dst_peer.workload,
                pod = %pod.name, namespace = %pod.namespace, error = %e, "connection failed");
            return;
        }
    };
    let record = ConnRecord::open(metrics, labels("-"), &shared.series);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let revoked = admitted
        .as_ref()
        .map(|a| a.revoked.clone())
        .unwrap_or_default();
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r,
        _ = revoked.cancelled() => {
            hbone::abort(&client);
            hbone::abort(&upstream);
            Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "closed by a policy change"))
        }
    };
    let (sent, recv, err) = match copied {
        Ok((a, b)) => (a, b, None),
        Err(e) => (0, 0, Some(e)),
    };
    // `sent` is client→app, the request direction either way.
    record.close(sent, recv);
    info!(target: "access",
        direction = dir.as_str(), protocol = "tcp", src.addr = %peer, dst.addr = %target,
        dst.service = service.map(|s| s.hostname.as_str()), dst.vip = vip.map(tracing::field::display),
        src.workload = %src.workload, dst.workload = %dst_peer.workload,
        pod = %pod.name, namespace = %pod.namespace,
        bytes_sent = sent, bytes_recv = recv,
        duration_ms = start.elapsed().as_millis() as u64,
        error = err.map(|e| e.to_string()).unwrap_or_default(),
        "connection complete");
}

/// Where an outbound connection goes.
struct Route<'a> {
    /// The app's own address.
    peer: SocketAddr,
    /// The app's original destination (a pod address or a Service VIP).
    dst: SocketAddr,
    /// The address served: `dst`, or the endpoint chosen for a Service VIP.
    target: SocketAddr,
    service: Option<&'a ServiceName>,
}

/// A Service VIP without an endpoint to serve it (or, with `--service-cidr`, an address in the
/// Service range that is no known Service): the app's connection is reset at once, as
/// kube-proxy rejects a Service without endpoints, and nothing leaves the pod.
fn refuse_no_endpoint(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    service: Option<&ServiceName>,
    why: NoEndpoint,
    shared: &PodShared,
) {
    let me = shared.me();
    let labels = TrafficLabels::new("source", &me, &crate::metrics::Peer::unknown(), false, "UH")
        .with_service(service);
    ConnRecord::open(&shared.mesh.metrics, labels, &shared.series).close(0, 0);
    info!(target: "access", direction = "outbound", src.addr = %peer, dst.addr = %dst,
        dst.service = service.map(|s| s.hostname.as_str()), src.workload = %me.workload,
        pod = %shared.ctx.name, namespace = %shared.ctx.namespace, error = %why,
        "connection failed");
    hbone::abort(&client);
}

/// Outbound to a captured workload: one CONNECT stream through the pod's HBONE pool, to
/// `route.target` (`:authority`), presenting the source's identity and expecting the
/// destination workload's.
async fn outbound_hbone(
    mut client: TcpStream,
    route: Route<'_>,
    dst_workload: &Workload,
    shared: &PodShared,
    start: Instant,
) {
    let Route {
        peer,
        dst,
        target,
        service,
    } = route;
    let vip = service.map(|_| dst);
    let pod = &shared.ctx;
    let src_identity = shared.identity();
    let req = hbone::client::Request {
        src_identity: src_identity.clone(),
        dst_identity: dst_workload.identity.clone(),
        target,
        client: peer,
        baggage: format!(
            "k8s.namespace.name={},k8s.pod.name={}",
            pod.namespace, pod.name
        ),
    };
    let me = shared.me();
    let dst_peer = shared.peer(target.ip(), Some(&dst_workload.identity));
    let labels = |flags: &str| {
        TrafficLabels::new("source", &me, &dst_peer, true, flags).with_service(service)
    };
    let metrics = &shared.mesh.metrics;
    let (tunnel, _guard) = match shared.pool.connect(&req).await {
        Ok(t) => t,
        Err(e) => {
            ConnRecord::open(metrics, labels("CONNECT"), &shared.series).close(0, 0);
            info!(target: "access", direction = "outbound", protocol = "hbone",
                src.addr = %peer, src.identity = %src_identity, dst.addr = %target,
                dst.service = service.map(|s| s.hostname.as_str()), dst.vip = vip.map(tracing::field::display),
                src.workload = %me.workload, dst.workload = %dst_peer.workload,
                dst.identity = %dst_workload.identity, pod = %pod.name, namespace = %pod.namespace,
                error = %e, "connection failed");
            // The app sees its connection reset, never a silent plaintext fallback.
            hbone::abort(&client);
            return;
        }
    };
    let record = ConnRecord::open(metrics, labels("-"), &shared.series);
    let _ = client.set_nodelay(true);
    let (sent, recv, err) =
        match hbone::relay(&mut client, tunnel, shared.mesh.settings.copy_buffer).await {
            Ok((a, b)) => (a, b, String::new()),
            Err(e) => (0, 0, e.to_string()),
        };
    record.close(sent, recv);
    info!(target: "access",
        direction = "outbound", protocol = "hbone", src.addr = %peer, src.identity = %src_identity,
        src.workload = %me.workload, dst.workload = %dst_peer.workload,
        dst.addr = %target, dst.service = service.map(|s| s.hostname.as_str()),
        dst.vip = vip.map(tracing::field::display), dst.identity = %dst_workload.identity,
        pod = %pod.name, namespace = %pod.namespace,
        bytes_sent = sent, bytes_recv = recv,
        duration_ms = start.elapsed().as_millis() as u64, error = err,
        "connection complete");
}
