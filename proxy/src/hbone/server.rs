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
use crate::cancel::Cancelled;
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
    // Made once, not per turn of the loop: the loop turns for every stream the connection
    // accepts, and a new sleep is a timer registered and removed, a new wait a lock taken.
    let mut stop_accepting = std::pin::pin!(Cancelled::new(&pod.accepting));
    let mut expiry = std::pin::pin!(tokio::time::sleep_until(expires.into()));
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            // Draining: GOAWAY lets the client finish its streams and open new ones elsewhere.
            _ = &mut stop_accepting, if !draining => {
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
            _ = &mut expiry => {
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
                        _ = Cancelled::new(&stopped) => {}
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

/// The client's own port, from the `forwarded` header's `for` (RFC 7239; the client side sends
/// `for="10.1.2.3:4567"` or `for="[fd00::1]:4567"`), when it names `peer_ip`, the address the
/// HBONE connection came from (its port is the client's choice within that address alone).
/// None without a header, a port or a match (a peer that names no port, as ztunnel does).
fn client_port(headers: &http::HeaderMap, peer_ip: IpAddr) -> Option<u16> {
    let value = headers.get(http::header::FORWARDED)?.to_str().ok()?;
    // The first element names the client; a proxy in between would append its own.
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.eq_ignore_ascii_case("for").then_some(value)
    })?;
    let addr: SocketAddr = node.trim_matches('"').parse().ok()?;
    (canonical(addr).ip() == peer_ip.to_canonical() && addr.port() != 0).then_some(addr.port())
}

/// Connects to the app `dst` from `source` (transparent, see
/// [`crate::socket::SocketFactory::upstream`]). From the client's own port where `source` names
/// one, so the app sees the address the client's kernel chose, as it would without the mesh,
/// and `connect` searches no port range (a search among every port the namespace's sockets
/// hold, TIME_WAIT ones included: each connection leaves one, as the agent closes first). The
/// port is `connect`'s only choice, not bound (a bound port would be skipped by every other
/// `connect` of the pod for as long as its TIME_WAIT lasts: the app's own connections failed
/// once a client had gone through the range). The client's kernel already made the 4-tuple
/// unique on its side, so here it is almost always free; where it is not (a TIME_WAIT socket
/// of this namespace with the same 4-tuple, a listener on the port), `connect` fails with
/// `EADDRNOTAVAIL` and the connection is made again from a port `connect` picks.
///
/// `bytes_in_hand`: the client's first bytes are here to be written as soon as the connection
/// exists, so the handshake's last ACK waits to ride with them
/// ([`crate::socket::hold_handshake_ack`]; [`hold_answer`] writes them and restores prompt
/// ACKs).
async fn connect_to_app(
    pod: &PodShared,
    dst: SocketAddr,
    source: Option<SocketAddr>,
    bytes_in_hand: bool,
) -> std::io::Result<TcpStream> {
    let attempt = async |source: Option<SocketAddr>| {
        let socket = pod.socket_to_app(dst, source)?;
        if bytes_in_hand {
            crate::socket::hold_handshake_ack((&socket).into());
        }
        tokio::time::timeout(pod.mesh.settings.connect_timeout, socket.connect(dst))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })
    };
    match attempt(source).await {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
            ) =>
        {
            let Some(taken) = source.filter(|s| s.port() != 0) else {
                return Err(e);
            };
            debug!(%dst, source = %taken, "the client's port is taken here ({e}); another");
            attempt(Some(SocketAddr::new(taken.ip(), 0))).await
        }
        r => r,
    }
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
    let labels = |flags: &'static str| {
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
    let source = (!pod.ctx.ips.contains(&peer.ip()) && !peer.ip().is_loopback()).then(|| {
        SocketAddr::new(
            peer.ip(),
            client_port(req.headers(), peer.ip()).unwrap_or(0),
        )
    });
    // Bytes the client sent ahead of the answer, if already here: the app's connection then
    // acknowledges its handshake with them. Looked for again once it exists (they may come
    // while it is made).
    let mut body = req.into_body();
    let in_hand = match early_data(&mut body) {
        Ok(f) => f,
        Err(e) => {
            debug!(%peer, %dst, "HBONE stream failed before 200: {e}");
            record.count(metrics, labels("-"), &pod.series);
            record.end(End::relayed(Err(e)));
            return;
        }
    };
    let held_ack = in_hand.is_some();
    let upstream = connect_to_app(&pod, dst, source, held_ack).await;
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
    let first = match in_hand {
        Some(f) => Ok(Some(f)),
        None => early_data(&mut body),
    };
    let early = match first {
        Ok(Some(first)) => tokio::select! {
            biased;
            _ = Cancelled::new(&expired) => Ok(0),
            _ = Cancelled::new(&admitted.revoked) => Ok(0),
            _ = Cancelled::new(&pod.stopped) => Ok(0),
            r = hold_answer(&mut upstream, &mut body, first, held_ack) => r.map(|(n, why)| {
                debug!(%peer, %dst, bytes = n, "200 held until {why}");
                n
            }),
        },
        Ok(None) => Ok(0),
        Err(e) => Err(e),
    };
    let early = match early {
        Ok(n) => n,
        Err(e) => {
            // Writing the early bytes failed (the app reset) or the stream did: both ends go.
            debug!(%peer, %dst, "HBONE stream failed before 200: {e}");
            super::abort(&upstream);
            record.count(metrics, labels("-"), &pod.series);
            record.end(End::relayed(Err(e)));
            return;
        }
    };
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
        recv: body,
        ended: false,
    };
    // Biased: when the connection is ended for its certificate, the stream's own error (the
    // connection is gone) is the consequence, not the cause.
    let result = tokio::select! {
        biased;
        _ = Cancelled::new(&expired) => {
            super::abort(&upstream);
            Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "closed: the client's certificate expired"))
        }
        _ = Cancelled::new(&admitted.revoked) => {
            super::abort(&upstream);
            Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "closed by a policy change"))
        }
        _ = Cancelled::new(&pod.stopped) => {
            super::abort(&upstream);
            Err(crate::context::stopped())
        }
        r = relay(&mut upstream, tunnel, pod.mesh.settings.copy_buffer) => r,
    };
    // The relay counts (upstream → stream, stream → upstream): client to app is the second.
    record.end(End::relayed(
        result.map(|(to_client, to_app)| (early + to_app, to_client)),
    ));
}

/// How long the 200 may wait for the app's first bytes ([`hold_answer`]): well inside the
/// client's CONNECT timeout (10 s), and never earlier than the timer a data-path worker always
/// has (`workers::anchor_timers`), so this timer does not wake the worker by itself.
const ANSWER_HOLD: Duration = Duration::from_secs(1);

/// Early bytes after which the 200 goes at once: half of what an Ambit client sends ahead of
/// the answer (`client::EARLY_LIMIT`), so a client that has more to send before its server
/// answers (an upload) never stops to wait for the 200.
const ANSWER_HOLD_BYTES: u64 = 16 << 10;

/// The client's first bytes if h2 already holds them: a client that sends the app's bytes
/// ahead of the answer (an Ambit client) has, by the time the app's connection exists (they
/// come with the request); one that waits for the 200 (ztunnel) has not. Polled once, with
/// a waker that is never woken (the relay's polls register their own).
fn early_data(body: &mut h2::RecvStream) -> std::io::Result<Option<Bytes>> {
    let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
    match body.poll_data(noop) {
        std::task::Poll::Ready(Some(d)) => d.map(Some).map_err(super::stream::h2_io),
        // Nothing yet, or the client's side already ended (the relay sees that again).
        std::task::Poll::Ready(None) | std::task::Poll::Pending => Ok(None),
    }
}

/// Before the 200, for a client that sent the app's first bytes ahead of the answer
/// ([`early_data`], `first`): writes them to the app and holds the answer until the app's
/// first bytes or its end are there to read, the client's side ends, [`ANSWER_HOLD_BYTES`]
/// went to the app, or [`ANSWER_HOLD`] passed. Returns the bytes written to the app, and
/// which of these ended the hold. `held_ack`: the app's socket holds its handshake's ACK for
/// these bytes ([`connect_to_app`]); prompt ACKs come back once they are written.
///
/// Why: the 200 then leaves in the same TLS record as the app's reply, instead of a record of
/// its own that wakes the client's agent for nothing (the client does not wait for it: its
/// app's bytes already went ahead). Per new connection that is one `writev` here and one
/// wake-up, `recvfrom` and frame of the client's agent fewer. A client that waits for the
/// 200 is answered at once.
async fn hold_answer(
    upstream: &mut TcpStream,
    body: &mut h2::RecvStream,
    first: Bytes,
    held_ack: bool,
) -> std::io::Result<(u64, Released)> {
    use tokio::io::AsyncWriteExt;
    let hold = tokio::time::sleep(ANSWER_HOLD);
    tokio::pin!(hold);
    let mut chunk = Some(first);
    let mut written = 0u64;
    loop {
        if let Some(d) = chunk.take() {
            upstream.write_all(&d).await?;
            if held_ack && written == 0 {
                crate::socket::ack_promptly((&*upstream).into());
            }
            written += d.len() as u64;
            let _ = body.flow_control().release_capacity(d.len());
        }
        if written >= ANSWER_HOLD_BYTES {
            return Ok((written, Released::Bytes));
        }
        tokio::select! {
            biased;
            // The app's first bytes, or its end (readable too), leave with the answer.
            r = upstream.readable() => {
                r?;
                return Ok((written, Released::Reply));
            }
            d = body.data() => match d {
                Some(d) => chunk = Some(d.map_err(super::stream::h2_io)?),
                // The client's side ended: the relay sees it again and half-closes the app.
                None => return Ok((written, Released::ClientEnd)),
            },
            _ = &mut hold => return Ok((written, Released::Timeout)),
        }
    }
}

/// What ended [`hold_answer`] (logged at debug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Released {
    /// The app's first bytes or its end were there to read.
    Reply,
    /// The client ended its side of the stream.
    ClientEnd,
    /// [`ANSWER_HOLD_BYTES`] went to the app.
    Bytes,
    /// [`ANSWER_HOLD`] passed.
    Timeout,
}

impl std::fmt::Display for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Released::Reply => "the app's reply",
            Released::ClientEnd => "the client's end",
            Released::Bytes => "enough early bytes",
            Released::Timeout => "the hold ran out",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The client's port is taken from the first `forwarded` element's `for`, only where it
    /// names the address the HBONE connection came from.
    #[test]
    fn the_clients_port_comes_from_forwarded_for_the_peers_own_address() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let port = |value: Option<&str>, peer: IpAddr| {
            let mut headers = http::HeaderMap::new();
            if let Some(v) = value {
                headers.insert(http::header::FORWARDED, v.parse().unwrap());
            }
            client_port(&headers, peer)
        };
        assert_eq!(port(Some("for=\"10.1.2.3:4567\""), v4), Some(4567));
        assert_eq!(port(Some("for=\"[fd00::1]:4567\""), v6), Some(4567));
        assert_eq!(port(Some("proto=https; For=\"10.1.2.3:80\""), v4), Some(80));
        assert_eq!(
            port(Some("for=\"10.1.2.3:1\", for=\"10.9.9.9:2\""), v4),
            Some(1)
        );
        // An IPv4 client over an IPv6 socket.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(port(Some("for=\"10.1.2.3:4567\""), mapped), Some(4567));
        for (value, peer) in [
            (None, v4),
            (Some("for=\"10.1.2.4:4567\""), v4),
            (Some("for=10.1.2.3"), v4),
            (Some("for=\"10.1.2.3:0\""), v4),
            (Some("for=\"10.1.2.3:4567\""), v6),
            (Some("by=\"10.1.2.3:4567\""), v4),
            (Some("for=\"10.9.9.9:2\", for=\"10.1.2.3:1\""), v4),
        ] {
            assert_eq!(port(value, peer), None, "{value:?} from {peer}");
        }
    }

    /// One CONNECT stream over an in-memory HTTP/2 connection: the client's request stream
    /// (`send`, for its early bytes), the destination's view of it, and a loopback TCP
    /// connection standing for the destination's connection to its app (`upstream`, `app`).
    struct Setup {
        send: h2::SendStream<Bytes>,
        body: h2::RecvStream,
        upstream: TcpStream,
        app: TcpStream,
    }

    async fn setup(early: &[u8], end: bool) -> Setup {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (req, respond) = conn.accept().await.unwrap().unwrap();
            // The answer is never sent; the stream stays open while the connection runs.
            tokio::spawn(async move {
                let _unanswered = respond;
                while conn.accept().await.is_some() {}
            });
            req.into_body()
        });
        let (h2c, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut h2c = h2c.ready().await.unwrap();
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (_response, mut send) = h2c.send_request(req, early.is_empty() && end).unwrap();
        if !early.is_empty() {
            send.send_data(Bytes::copy_from_slice(early), end).unwrap();
        }
        let body = server.await.unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (app, _) = l.accept().await.unwrap();
        Setup {
            send,
            body,
            upstream,
            app,
        }
    }

    /// Runs [`hold_answer`] on its own task (it owns the app's socket and the stream until it
    /// returns, and gives them back).
    fn hold(
        mut upstream: TcpStream,
        mut body: h2::RecvStream,
        first: Bytes,
        held_ack: bool,
    ) -> tokio::task::JoinHandle<(std::io::Result<(u64, Released)>, TcpStream)> {
        tokio::spawn(async move {
            let r = hold_answer(&mut upstream, &mut body, first, held_ack).await;
            drop(body);
            (r, upstream)
        })
    }

    async fn read_exactly(app: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut b))
            .await
            .expect("the app got nothing within 5 s")
            .unwrap();
        b
    }

    /// Early bytes reach the app before the 200, and so do more of the client's bytes sent
    /// while it waits; the answer is held while the app is silent and goes as soon as the
    /// app's reply is there to read (the reply stays for the relay to carry behind the 200).
    #[tokio::test]
    async fn the_answer_waits_for_the_apps_reply_while_the_clients_bytes_reach_the_app() {
        let Setup {
            mut send,
            mut body,
            upstream,
            mut app,
        } = setup(b"hello", false).await;
        let first = body.data().await.unwrap().unwrap();
        let held = hold(upstream, body, first, false);
        assert_eq!(read_exactly(&mut app, 5).await, b"hello");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !held.is_finished(),
            "the answer went before the app said anything"
        );
        send.send_data(Bytes::from_static(b" world"), false)
            .unwrap();
        assert_eq!(read_exactly(&mut app, 6).await, b" world");
        assert!(
            !held.is_finished(),
            "the answer went with the client's bytes"
        );
        app.write_all(b"reply").await.unwrap();
        let (r, mut upstream) = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("the app replied: the answer must go")
            .unwrap();
        assert_eq!(
            r.unwrap(),
            (11, Released::Reply),
            "bytes written before the answer"
        );
        assert_eq!(read_exactly(&mut upstream, 5).await, b"reply");
    }

    /// A socket that held its handshake's ACK for the client's early bytes acknowledges promptly
    /// again once they are written: an app answering in pieces (Nagle on) must not wait for an
    /// ACK delayed until a write of ours that may never come. A socket that held nothing is
    /// left as it was.
    #[tokio::test]
    async fn prompt_acks_come_back_once_the_held_bytes_are_written() {
        let quick = |s: &socket2::Socket| s.tcp_quickack().unwrap();
        for held_ack in [true, false] {
            let Setup {
                send: _open,
                mut body,
                upstream,
                mut app,
            } = setup(b"hello", false).await;
            // The same socket, looked at while the hold owns it.
            let probe = socket2::SockRef::from(&upstream).try_clone().unwrap();
            if held_ack {
                crate::socket::hold_handshake_ack((&upstream).into());
            }
            assert_eq!(quick(&probe), !held_ack, "before the write");
            let first = body.data().await.unwrap().unwrap();
            // This runtime has one thread: the hold runs up to its next wait (after the write
            // and what follows it) before the app's read returns here.
            let held = hold(upstream, body, first, held_ack);
            assert_eq!(read_exactly(&mut app, 5).await, b"hello");
            assert!(
                quick(&probe),
                "held ACK {held_ack}: prompt ACKs once the bytes are written"
            );
            held.abort();
        }
    }

    /// The answer is not held past the client's end, past half of an Ambit client's early
    /// limit (it would then stop to wait for the 200 while the app waits for more), or past
    /// [`ANSWER_HOLD`] when the app stays silent.
    #[tokio::test]
    async fn the_answer_goes_when_the_client_ends_sends_enough_or_the_hold_runs_out() {
        let limit = Duration::from_secs(5);
        // The client's side ends with its early bytes.
        let s = setup(b"bye", true).await;
        let (mut body, mut app) = (s.body, s.app);
        let first = body.data().await.unwrap().unwrap();
        let (r, _) = tokio::time::timeout(limit, hold(s.upstream, body, first, false))
            .await
            .expect("ended client: answer held")
            .unwrap();
        assert_eq!(r.unwrap(), (3, Released::ClientEnd));
        assert_eq!(read_exactly(&mut app, 3).await, b"bye");
        // More than ANSWER_HOLD_BYTES ahead of the answer (frames of at most 16 KiB).
        let big = vec![7u8; 20 << 10];
        let s = setup(&big, false).await;
        let (mut body, mut app) = (s.body, s.app);
        let first = body.data().await.unwrap().unwrap();
        let (r, _) = tokio::time::timeout(limit, hold(s.upstream, body, first, false))
            .await
            .expect("enough early bytes: answer held")
            .unwrap();
        let (n, why) = r.unwrap();
        assert!(n >= ANSWER_HOLD_BYTES, "{n} bytes before the answer");
        assert_eq!(why, Released::Bytes);
        assert_eq!(read_exactly(&mut app, n as usize).await, big[..n as usize]);
        // A silent app: the hold runs out.
        let s = setup(b"x", false).await;
        let mut body = s.body;
        let first = body.data().await.unwrap().unwrap();
        let (r, _) =
            tokio::time::timeout(ANSWER_HOLD + limit, hold(s.upstream, body, first, false))
                .await
                .expect("silent app: answer held past ANSWER_HOLD")
                .unwrap();
        assert_eq!(r.unwrap(), (1, Released::Timeout));
    }

    /// Only a client whose bytes came with the request is held: one that waits for the 200
    /// (ztunnel) has sent nothing, and is answered at once.
    #[tokio::test]
    async fn only_bytes_already_there_count_as_early() {
        let mut s = setup(b"", false).await;
        assert!(early_data(&mut s.body).unwrap().is_none());
        let mut s = setup(b"hi", false).await;
        // h2 takes the DATA frame on its connection task: give it its turns (bounded).
        let mut got = None;
        for _ in 0..1000 {
            got = early_data(&mut s.body).unwrap();
            if got.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(got.as_deref(), Some(&b"hi"[..]));
    }
}
