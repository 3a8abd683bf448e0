//! The HBONE server of one pod (15008): TLS terminated with the pod's own certificate, client
//! certificate required; each CONNECT stream is delivered to the app from the client's real
//! address.
//!
//! Answers: 400 for anything but CONNECT, an authority that is not `<this pod's IP>:<port>`, or
//! an Ambit port; 503 when the app's port refuses; 200 only once the app connection exists.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Tunnel, relay};
use crate::access::{ConnRecord, End};
use crate::context::{PodShared, RESERVED_PORTS};
use crate::identity::Identity;
use crate::metrics::{GaugeGuard, ProxyMetrics, TrafficLabels};
use crate::socket::canonical;
use crate::tls::{ResolveWith, server_config, svid_identity};

/// TLS and HTTP/2 handshakes together: a connection that has not finished both by then is
/// dropped (slow or stuck clients).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, pod: Arc<PodShared>, stop: CancellationToken) {
    let resolver = {
        let pod = pod.clone();
        ResolveWith(move || {
            let id = pod.identity();
            match pod.mesh.certs.certified_key(&id) {
                Ok(k) => Some(k),
                Err(e) => {
                    warn!(pod = %pod.ctx.name, identity = %id, "no certificate to serve HBONE: {e}");
                    None
                }
            }
        })
    };
    let config = match server_config(
        Arc::new(resolver),
        pod.mesh.certs.roots(),
        &pod.mesh.trust_domain,
    ) {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.ctx.name, "HBONE server configuration failed: {e}");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = pod.accepting.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(pod = %pod.ctx.name, "HBONE accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, shared, stop) = (acceptor.clone(), pod.clone(), stop.clone());
        // Counted from here, before the hand-off, so that a drain never misses it.
        let open = pod.hbone_guard();
        // The connection and its streams' tasks run on one worker thread.
        pod.mesh.workers.run(tcp, move |tcp| async move {
            let _open = open;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection(tcp, canonical(peer), acceptor, shared) => {}
            }
        });
    }
}

/// One inbound HBONE connection, bounded three ways: the handshakes must finish within
/// [`HANDSHAKE_TIMEOUT`]; without streams for `inbound_idle_timeout` it is closed (GOAWAY);
/// and it ends, streams included, when the client's certificate expires — a connection never
/// outlives the proof of its identity.
async fn connection(tcp: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor, pod: Arc<PodShared>) {
    let _ = tcp.set_nodelay(true);
    super::join_shortcut(&pod.mesh, &tcp, peer.ip());
    let handshakes = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let tls = match tokio::time::timeout_at(handshakes, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            info!(pod = %pod.ctx.name, %peer, "HBONE handshake refused: {e}");
            return;
        }
        Err(_) => {
            info!(pod = %pod.ctx.name, %peer, "HBONE handshake timed out");
            return;
        }
    };
    let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let expires = peer_cert.map(crate::tls::expiry);
    let peer_id = peer_cert.and_then(|c| svid_identity(c).ok());
    let (Some(peer_id), Some(expires)) = (peer_id, expires) else {
        // The verifier only lets identified clients through; this is defence in depth.
        warn!(pod = %pod.ctx.name, %peer, "HBONE client without identity after handshake");
        return;
    };
    let s = &pod.mesh.settings;
    let idle_timeout = s.inbound_idle_timeout;
    let handshake = h2::server::Builder::new()
        .initial_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_frame_size(s.max_frame_size)
        .max_concurrent_streams(200)
        .max_header_list_size(64 << 10)
        .max_send_buffer_size(s.stream_send_buffer)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout_at(handshakes, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(pod = %pod.ctx.name, %peer, "HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            info!(pod = %pod.ctx.name, %peer, "HBONE handshake timed out (HTTP/2 preface)");
            return;
        }
    };
    debug!(pod = %pod.ctx.name, %peer, client = %peer_id, "HBONE connection accepted");
    let _conn_gauge = GaugeGuard::new(ProxyMetrics::gauge(
        &pod.mesh.metrics.hbone_connections,
        "inbound",
    ));
    let peer_id = Arc::new(peer_id);
    // Cancelled when the client's certificate expires: every stream of the connection ends.
    let expired = CancellationToken::new();
    let streams = Arc::new(StreamCount::default());
    let mut draining = false;
    let mut idle_check = tokio::time::interval(idle_timeout / 4);
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            // Draining: GOAWAY lets the client finish its streams and open new ones elsewhere.
            _ = pod.accepting.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            _ = idle_check.tick(), if !draining => {
                if streams.idle_for() >= Some(idle_timeout) {
                    debug!(pod = %pod.ctx.name, %peer, "HBONE connection idle: closing");
                    draining = true;
                    conn.graceful_shutdown();
                }
                continue;
            }
            _ = tokio::time::sleep_until(expires.into()) => {
                info!(pod = %pod.ctx.name, %peer, client = %peer_id,
                    streams = streams.open(),
                    "HBONE connection closed: the client's certificate expired");
                expired.cancel();
                return;
            }
        };
        match next {
            Some(Ok((req, respond))) => {
                let active = pod.active_guard();
                let counted = streams.open_one();
                let (peer_id, pod, expired) = (peer_id.clone(), pod.clone(), expired.clone());
                tokio::spawn(async move {
                    let _active = active;
                    let _counted = counted;
                    let stopped = pod.stopped.clone();
                    // Biased: a relayed stream ends itself on `stopped`, with a reset.
                    tokio::select! {
                        biased;
                        _ = stream(req, respond, peer, peer_id, pod, expired) => {}
                        _ = stopped.cancelled() => {}
                    }
                });
            }
            Some(Err(e)) => {
                debug!(pod = %pod.ctx.name, %peer, "HBONE connection ended: {e}");
                return;
            }
            None => return,
        }
    }
}

/// Open streams of one connection, and since when it has had none.
struct StreamCount(std::sync::Mutex<(usize, Instant)>);

impl Default for StreamCount {
    fn default() -> Self {
        Self(std::sync::Mutex::new((0, Instant::now())))
    }
}

impl StreamCount {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self) -> usize {
        self.lock().0
    }

    /// How long the connection has had no stream; `None` while one is open.
    fn idle_for(&self) -> Option<Duration> {
        let (n, since) = *self.lock();
        (n == 0).then(|| since.elapsed())
    }

    fn open_one(self: &Arc<Self>) -> OpenStream {
        self.lock().0 += 1;
        OpenStream(self.clone())
    }
}

struct OpenStream(Arc<StreamCount>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.0 -= 1;
        if g.0 == 0 {
            g.1 = Instant::now();
        }
    }
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let r = Response::builder()
        .status(status)
        .body(())
        .expect("a bare status response is always valid");
    let _ = respond.send_response(r, true);
}

/// The target of a CONNECT, if it is acceptable for this pod.
fn target(req: &Request<h2::RecvStream>, pod_ips: &[IpAddr]) -> Result<SocketAddr, &'static str> {
    if req.method() != http::Method::CONNECT {
        return Err("not a CONNECT request");
    }
    let authority = req.uri().authority().ok_or("no :authority")?;
    let addr: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| "the authority is not <ip>:<port>")?;
    let addr = canonical(addr);
    if !pod_ips.contains(&addr.ip()) {
        return Err("the authority is not this pod's address");
    }
    if RESERVED_PORTS.contains(&addr.port()) || addr.port() == 0 {
        return Err("the authority names a reserved port");
    }
    Ok(addr)
}

async fn stream(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: Arc<Identity>,
    pod: Arc<PodShared>,
    expired: CancellationToken,
) {
    let mut record = ConnRecord::new(&pod.ctx, "inbound", "hbone", peer);
    record.src_identity(&peer_id);
    let dst = match target(&req, &pod.ctx.ips) {
        Ok(d) => d,
        Err(why) => {
            record.end(End::Refused(format!("HBONE 400: {why} ({})", req.uri())));
            answer(&mut respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let conn = crate::authz::Connection {
        src_identity: Some((*peer_id).clone()),
        src_ip: peer.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let src = pod.peer(peer.ip(), Some(&peer_id));
    let me = pod.me();
    // The client's VIP is not seen here; name a Service this port is an endpoint of.
    let service = pod.mesh.directory.service_of_endpoint(dst);
    record
        .dst(dst)
        .workloads(&src.workload, &me.workload)
        .service(service.as_deref(), None);
    let labels = |flags: &str| {
        TrafficLabels::new("destination", &src, &me, true, flags).with_service(service.as_deref())
    };
    let metrics = &pod.mesh.metrics;
    let admitted = match pod.admit(conn, "hbone") {
        Ok(a) => a,
        Err(why) => {
            record.count(metrics, labels("DENY"), &pod.series);
            record.end(End::Refused(format!("HBONE 401: {why}")));
            answer(&mut respond, StatusCode::UNAUTHORIZED);
            return;
        }
    };
    // The app sees the client's own address (transparent bind), unless the client is this pod.
    let source =
        (!pod.ctx.ips.contains(&peer.ip()) && !peer.ip().is_loopback()).then_some(peer.ip());
    let upstream = match pod.socket_to_app(dst, source) {
        Ok(s) => tokio::time::timeout(pod.mesh.settings.connect_timeout, s.connect(dst))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            }),
        Err(e) => Err(e),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            record.count(metrics, labels("CONNECT"), &pod.series);
            record.end(End::Failed(format!("HBONE 503: {e}")));
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("a bare status response is always valid");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            // The client reset the stream (its app's connection failed): so is the app's.
            debug!(%peer, %dst, "HBONE stream gone before 200: {e}");
            super::abort(&upstream);
            return;
        }
    };
    record.count(metrics, labels("-"), &pod.series);
    let _stream_gauge = GaugeGuard::new(ProxyMetrics::gauge(&metrics.hbone_streams, "inbound"));
    let tunnel = Tunnel {
        send,
        recv: req.into_body(),
    };
    // Biased: when the connection is ended for its certificate, the stream's own error (the
    // connection is gone) is the consequence, not the cause.
    let result = tokio::select! {
        biased;
        _ = expired.cancelled() => {
            super::abort(&upstream);
            Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "closed: the client's certificate expired"))
        }
        _ = admitted.revoked.cancelled() => {
            super::abort(&upstream);
            Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "closed by a policy change"))
        }
        _ = pod.stopped.cancelled() => {
            super::abort(&upstream);
            Err(crate::context::stopped())
        }
        r = relay(&mut upstream, tunnel, pod.mesh.settings.copy_buffer) => r,
    };
    // The relay counts (upstream → stream, stream → upstream): client to app is the second.
    record.end(End::relayed(
        result.map(|(to_client, to_app)| (to_app, to_client)),
    ));
}
