//! The 15001 and 15006 listeners. Outbound (15001): a Service VIP is first resolved to one of
//! the Service's endpoints ([`crate::service`]); a destination the workload store knows as a
//! captured workload goes through HBONE; anything else is forwarded as is (to the chosen
//! endpoint, for a Service). Inbound plaintext (15006): forwarded to the app, keeping the
//! client's source address, when it was addressed to one of the pod's own IPs (reset
//! otherwise).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::access::{ConnRecord, End};
use crate::cancel::Cancelled;
use crate::context::{PodShared, RESERVED_PORTS, stopped};
use crate::hbone;
use crate::mesh::Workload;
use crate::metrics::{Peer, TrafficLabels};
use crate::service::{NoEndpoint, ServiceName};
use crate::socket::{canonical, original_dst};

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

/// Accepts until `stop` fires; every connection runs in its own task on one of the data-path
/// workers ([`crate::workers`]), also bound to `stop`.
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
        let active = pod.active_guard();
        let (shared, stop) = (pod.clone(), stop.clone());
        pod.mesh.workers.run(stream, move |stream| async move {
            let _active = active;
            // Biased: a connection being relayed ends itself on `stop` (with a reset, see
            // `forward`); one still being set up is dropped.
            tokio::select! {
                biased;
                _ = forward(dir, stream, canonical(peer), shared) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn forward(dir: Direction, mut client: TcpStream, peer: SocketAddr, shared: Arc<PodShared>) {
    let pod = &shared.ctx;
    let dst = match original_dst(&client, peer) {
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
    let mut record = ConnRecord::new(pod, dir.as_str(), "tcp", peer);
    record.dst(dst);
    // Inbound plaintext is served for this pod's own addresses only: a neighbour that routes a
    // packet for any other destination to the pod (the redirect takes it whatever its
    // address) must not get the agent to connect there on its behalf.
    if dir == Direction::Inbound
        && !pod
            .ips
            .iter()
            .any(|ip| ip.to_canonical() == dst.ip().to_canonical())
    {
        record.end(End::Refused(
            "the destination is not an address of this pod".into(),
        ));
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
                    return refuse_no_endpoint(client, record, Some(&svc.name), e, &shared);
                }
            }
            service = Some(svc.name.clone());
        } else if shared.mesh.directory.in_service_range(dst.ip()) {
            let why = NoEndpoint::UnknownService { vip: dst };
            return refuse_no_endpoint(client, record, None, why, &shared);
        }
        // Outbound to a Service, what the app called (`dst`) is the VIP; `target` the endpoint.
        record
            .dst(target)
            .service(service.as_deref(), service.is_some().then_some(dst));
        if let Some(w) = shared.mesh.directory.by_ip(target.ip())
            && w.hbone
        {
            return outbound_hbone(client, record, target, service.as_deref(), &w, &shared).await;
        }
    } else {
        // Inbound the VIP is not known; name a Service this port is an endpoint of.
        service = shared.mesh.directory.service_of_endpoint(dst);
        record.service(service.as_deref(), None);
    }
    let service = service.as_deref();
    let (reporter, src, dst_peer) = match dir {
        Direction::Inbound => ("destination", shared.peer(peer.ip(), None), shared.me()),
        Direction::Outbound => ("source", shared.me(), shared.peer(target.ip(), None)),
    };
    record.workloads(&src.workload, &dst_peer.workload);
    let labels = |flags: &'static str| {
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
            Err(why) => {
                record.count(metrics, labels("DENY"), &shared.series);
                record.end(End::Refused(why.to_string()));
                hbone::abort(&client);
                return;
            }
        }
    } else {
        None
    };
    // Inbound: connect to the app from the client's own address, unless the client is the pod
    // itself (then the ordinary local address is already right). Not from its port: the
    // client's own connection, redirected here, keeps its original 4-tuple in this
    // namespace's conntrack table, and a second connection with the same tuple would clash.
    let source = match dir {
        Direction::Inbound if !pod.ips.contains(&peer.ip()) && !peer.ip().is_loopback() => {
            Some(SocketAddr::new(peer.ip(), 0))
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
            record.count(metrics, labels("CONNECT"), &shared.series);
            record.end(End::Failed(e.to_string()));
            return;
        }
    };
    record.count(metrics, labels("-"), &shared.series);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let revoked = admitted
        .as_ref()
        .map(|a| a.revoked.clone())
        .unwrap_or_default();
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r,
        _ = Cancelled::new(&revoked) => {
            hbone::abort(&client);
            hbone::abort(&upstream);
            Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "closed by a policy change"))
        }
        _ = Cancelled::new(&shared.stopped) => {
            hbone::abort(&client);
            hbone::abort(&upstream);
            Err(stopped())
        }
    };
    // `sent` is client→app, the request direction either way.
    record.end(End::relayed(copied));
}

/// A Service VIP without an endpoint to serve it (or, with `--service-cidr`, an address in the
/// Service range that is no known Service): the app's connection is reset at once, as
/// kube-proxy rejects a Service without endpoints, and nothing leaves the pod.
fn refuse_no_endpoint<'a>(
    client: TcpStream,
    mut record: ConnRecord<'a>,
    service: Option<&ServiceName>,
    why: NoEndpoint,
    shared: &'a PodShared,
) {
    let me = shared.me();
    let labels =
        TrafficLabels::new("source", &me, &Peer::unknown(), false, "UH").with_service(service);
    record.service(service, None);
    record.workloads(&me.workload, &crate::metrics::UNKNOWN.into());
    record.count(&shared.mesh.metrics, labels, &shared.series);
    record.end(End::Failed(why.to_string()));
    hbone::abort(&client);
}

/// Outbound to a captured workload: one CONNECT stream through the pod's HBONE pool, to
/// `target` (`:authority`), presenting the source's identity and expecting the destination
/// workload's.
async fn outbound_hbone<'a>(
    mut client: TcpStream,
    mut record: ConnRecord<'a>,
    target: SocketAddr,
    service: Option<&ServiceName>,
    dst_workload: &Workload,
    shared: &'a PodShared,
) {
    let src_identity = shared.identity();
    let me = shared.me_as(&src_identity);
    let dst_peer = shared.peer(target.ip(), Some(&dst_workload.identity));
    record
        .protocol("hbone")
        .src_identity(&src_identity)
        .dst_identity(&dst_workload.identity)
        .workloads(&me.workload, &dst_peer.workload);
    let req = hbone::client::Request {
        src_identity,
        dst_identity: dst_workload.identity.clone(),
        target,
        client: record.src_addr(),
        baggage: shared.baggage.clone(),
    };
    let labels = |flags: &'static str| {
        TrafficLabels::new("source", &me, &dst_peer, true, flags).with_service(service)
    };
    let metrics = &shared.mesh.metrics;
    let (tunnel, _guard, early) = match shared.pool.connect(&req, &mut client).await {
        Ok(t) => t,
        Err(e) => {
            record.count(metrics, labels("CONNECT"), &shared.series);
            record.end(End::Failed(e.to_string()));
            // The app sees its connection reset, never a silent plaintext fallback.
            hbone::abort(&client);
            return;
        }
    };
    record.count(metrics, labels("-"), &shared.series);
    let _ = client.set_nodelay(true);
    let copied = tokio::select! {
        r = hbone::relay(&mut client, tunnel, shared.mesh.settings.copy_buffer) => r,
        _ = Cancelled::new(&shared.stopped) => {
            // The stream is reset as the relay is dropped; the app's connection too.
            hbone::abort(&client);
            Err(stopped())
        }
    };
    // The app's bytes sent ahead of the CONNECT answer count as sent.
    record.end(End::relayed(
        copied.map(|(sent, received)| (sent + early, received)),
    ));
}
