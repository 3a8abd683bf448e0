//! The HBONE client of one pod: pooled mutual-TLS HTTP/2 connections to destination pods,
//! one CONNECT stream per proxied TCP connection.
//!
//! Pool key: (source identity, destination identity, destination `ip:15008`, data-path
//! worker: a connection serves the streams of its own worker thread only). A connection
//! carries at most `max_streams_per_connection` streams (or fewer if the peer says so); a
//! full one makes the pool open another. Connecting happens under the key's lock, so a burst
//! of new connections to one destination shares one handshake instead of racing many.
//!
//! Early data: the app's first bytes go right behind the CONNECT request, without waiting for
//! the answer, so a client-speaks-first protocol saves one round trip per connection. The
//! destination holds them until its connection to the app exists and discards them when it
//! refuses (401, 503): they reach the app only behind a 200, once, in order. An app that
//! closes its side before the answer ends the stream then, not after the answer: an Ambit
//! destination holds the 200 until the app's reply (`server::hold_answer`), and the reply of
//! a request read to its end comes only once that end reached the app.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{debug, info};

use super::{Error, Tunnel};
use crate::access::Addr;
use crate::identity::Identity;
use crate::mesh::Mesh;
use crate::metrics::{GaugeGuard, ProxyMetrics};
use crate::socket::SocketFactory;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: Identity,
    dst: Identity,
    addr: SocketAddr,
    /// The data-path worker using the connection: its driver runs on that worker's thread,
    /// with the relays of its streams (see [`crate::workers`]).
    worker: Option<usize>,
}

struct Conn {
    send: SendRequest<Bytes>,
    streams: AtomicUsize,
    max_streams: usize,
    idle_since: Mutex<Instant>,
    closed: Arc<AtomicBool>,
    /// New streams only until either side's certificate expires: a pooled connection never
    /// extends the life of an identity proof beyond its certificate.
    fresh_until: Instant,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.streams.load(Ordering::Acquire) < self.max_streams
            && Instant::now() < self.fresh_until
    }
}

/// Keeps a pooled connection counted as busy while a stream uses it.
pub struct StreamGuard(Arc<Conn>, #[allow(dead_code)] GaugeGuard);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

type Slot = Arc<AsyncMutex<Vec<Arc<Conn>>>>;

/// How many connections one CONNECT may try when streams are refused unprocessed.
const ATTEMPTS: usize = 3;

/// The most of the app's bytes sent ahead of the CONNECT answer (and kept until it, to be sent
/// again on a retry); beyond, reading the app waits for the answer. Below HTTP/2's default
/// stream window, so the destination can always take it.
const EARLY_LIMIT: usize = 32 << 10;

/// The app's bytes sent ahead of the CONNECT answer.
#[derive(Default)]
struct Early {
    sent: Vec<Bytes>,
    len: usize,
    /// The app closed its side before the answer: the relay sends the end of the stream.
    done: bool,
}

impl Early {
    fn wants_more(&self) -> bool {
        !self.done && self.len < EARLY_LIMIT
    }
}

/// The outcome of one CONNECT attempt that did not succeed.
enum Attempt {
    /// The peer provably did not process the stream: safe to try another connection.
    Retry(Error),
    Fail(Error),
}

pub struct Pool {
    factory: Arc<dyn SocketFactory>,
    mesh: Arc<Mesh>,
    slots: Mutex<HashMap<Key, Slot>>,
}

/// The `forwarded` header naming the app's address. Never indexed (HPACK): it differs on every
/// connection (the port), so adding it to the dynamic table only evicts entries that repeat
/// (the `:authority`, `baggage`) and costs both ends a table update per CONNECT.
fn forwarded(client: SocketAddr) -> http::HeaderValue {
    let mut v = http::HeaderValue::try_from(format!("for=\"{}\"", Addr(client)))
        .expect("a quoted socket address is a valid header value");
    v.set_sensitive(true);
    v
}

/// What the outbound side knows about one proxied connection.
pub struct Request {
    pub src_identity: Identity,
    pub dst_identity: Identity,
    /// The app's original destination (`:authority`).
    pub target: SocketAddr,
    /// The app's own address (the `forwarded` header).
    pub client: SocketAddr,
    /// `baggage` describing the source workload ([`crate::context::PodShared::baggage`]).
    pub baggage: Option<http::HeaderValue>,
}

impl Pool {
    pub fn new(factory: Arc<dyn SocketFactory>, mesh: Arc<Mesh>) -> Self {
        Self {
            factory,
            mesh,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &Key) -> Slot {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Opens a CONNECT stream to `req.target` through the destination pod's 15008. Succeeds
    /// only on a 200 answer. What `app` sends meanwhile goes ahead of the answer (see the
    /// module's notes); returns how many of its bytes were sent so.
    ///
    /// A stream the peer provably did not process — refused because the pooled connection got
    /// a GOAWAY (the destination's agent is draining, e.g. during an upgrade) or with
    /// REFUSED_STREAM, or never sent because the connection had just ended — is retried on
    /// another connection, up to [`ATTEMPTS`] times: a drain must not fail new connections.
    pub async fn connect(
        &self,
        req: &Request,
        app: &mut TcpStream,
    ) -> Result<(Tunnel, StreamGuard, u64), Error> {
        let addr = SocketAddr::new(req.target.ip(), ambit_common::INBOUND_HBONE_PORT);
        let key = Key {
            src: req.src_identity.clone(),
            dst: req.dst_identity.clone(),
            addr,
            worker: crate::workers::current(),
        };
        let mut attempt = 1;
        let mut early = Early::default();
        loop {
            let guard = self.checkout(&key).await?;
            let answer = self.exchange(&guard, req, addr, app, &mut early).await;
            if early.len > 0 {
                debug!(%addr, attempt, bytes = early.len, ok = answer.is_ok(), "app bytes sent ahead of the CONNECT answer");
            }
            match answer {
                Ok(tunnel) => return Ok((tunnel, guard, early.len as u64)),
                Err(Attempt::Retry(e)) if attempt < ATTEMPTS => {
                    // This connection takes no more streams; the next attempt opens or picks
                    // another.
                    guard.0.closed.store(true, Ordering::Release);
                    debug!(%addr, attempt, "CONNECT not processed by the peer, retrying: {e}");
                    attempt += 1;
                }
                Err(Attempt::Retry(e) | Attempt::Fail(e)) => return Err(e),
            }
        }
    }

    /// A usable pooled connection for `key` (opened if none), with one stream reserved on it.
    async fn checkout(&self, key: &Key) -> Result<StreamGuard, Error> {
        let addr = key.addr;
        let timeout = self.mesh.settings.connect_timeout;
        let slot = self.slot(key);
        let mut conns = slot.lock().await;
        conns.retain(|c| !c.closed.load(Ordering::Acquire) && Instant::now() < c.fresh_until);
        let conn = match conns.iter().find(|c| c.usable()) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(
                    tokio::time::timeout(timeout, self.open(key))
                        .await
                        .map_err(|_| Error::Timeout {
                            addr,
                            what: "HBONE connection setup",
                        })??,
                );
                conns.push(c.clone());
                c
            }
        };
        conn.streams.fetch_add(1, Ordering::AcqRel);
        let gauge = ProxyMetrics::gauge(&self.mesh.metrics.hbone_streams, "outbound");
        Ok(StreamGuard(conn, GaugeGuard::new(gauge)))
    }

    /// One CONNECT on `guard`'s connection: the request, the app's bytes of earlier attempts,
    /// then whatever the app sends until the answer.
    async fn exchange(
        &self,
        guard: &StreamGuard,
        req: &Request,
        addr: SocketAddr,
        app: &mut TcpStream,
        early: &mut Early,
    ) -> Result<Tunnel, Attempt> {
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(Addr(req.target).to_string())
            .version(http::Version::HTTP_2)
            .header("forwarded", forwarded(req.client));
        if let Some(b) = &req.baggage {
            request = request.header("baggage", b.clone());
        }
        let request = request
            .body(())
            .expect("a CONNECT request from a socket address is always valid");
        // Before the request is on the wire any failure is retryable; after, only a refusal
        // that proves the peer did not process the stream.
        let unsent = |source| Attempt::Retry(Error::H2 { addr, source });
        let sent = |source: h2::Error| {
            let refused =
                source.is_go_away() || source.reason() == Some(h2::Reason::REFUSED_STREAM);
            let e = Error::H2 { addr, source };
            if refused {
                Attempt::Retry(e)
            } else {
                Attempt::Fail(e)
            }
        };
        let exchange = async {
            let mut send = guard.0.send.clone().ready().await.map_err(unsent)?;
            let (mut response, mut stream) = send.send_request(request, false).map_err(unsent)?;
            // Queued by h2 whatever the stream's send window (bounded by EARLY_LIMIT). A send
            // error means the stream is gone, which the answer reports.
            for b in &early.sent {
                let _ = stream.send_data(b.clone(), false);
            }
            if early.done {
                let _ = stream.send_data(Bytes::new(), true);
            }
            let mut buf = BytesMut::with_capacity(4 << 10);
            let response = loop {
                tokio::select! {
                    biased;
                    r = &mut response => break r.map_err(sent)?,
                    n = app.read_buf(&mut buf), if early.wants_more() => match n {
                        // The app is done sending: so is the stream, before the answer (a
                        // destination that holds its answer for the app's reply, as Ambit's
                        // does, must not wait for an end that would only come after it).
                        Ok(0) => {
                            early.done = true;
                            crate::workers::closing();
                            let _ = stream.send_data(Bytes::new(), true);
                        }
                        // The app's connection failed: the stream is dropped unanswered (a
                        // reset), and the destination resets its app connection in turn.
                        Err(e) => return Err(Attempt::Fail(Error::App(e))),
                        Ok(n) => {
                            let b = buf.split().freeze();
                            early.len += n;
                            early.sent.push(b.clone());
                            let _ = stream.send_data(b, false);
                            buf.reserve(4 << 10);
                        }
                    },
                }
            };
            Ok::<_, Attempt>((response, stream))
        };
        let (response, stream) = tokio::time::timeout(self.mesh.settings.connect_timeout, exchange)
            .await
            .map_err(|_| {
                Attempt::Fail(Error::Timeout {
                    addr,
                    what: "CONNECT",
                })
            })??;
        if response.status() != http::StatusCode::OK {
            return Err(Attempt::Fail(Error::Status {
                addr,
                status: response.status(),
            }));
        }
        Ok(Tunnel {
            send: stream,
            recv: response.into_body(),
            ended: early.done,
        })
    }

    async fn open(&self, key: &Key) -> Result<Conn, Error> {
        let addr = key.addr;
        let s = &self.mesh.settings;
        let cert =
            self.mesh
                .certs
                .certified_key(&key.src)
                .map_err(|reason| Error::Certificate {
                    identity: key.src.to_string(),
                    reason,
                })?;
        let own_expiry = crate::tls::expiry(&cert.cert[0]);
        let config =
            crate::tls::client_config(cert, self.mesh.certs.roots(), vec![key.dst.clone()])?;
        let socket = self
            .factory
            .upstream(addr, None)
            .map_err(|source| Error::Connect { addr, source })?;
        let cc = self.mesh.settings.hbone_congestion_control.as_deref();
        crate::socket::set_congestion_control((&socket).into(), cc);
        let tcp = socket
            .connect(addr)
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        super::join_shortcut(&self.mesh, &tcp, addr.ip());
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| Error::Tls { addr, source })?;
        let peer_expiry = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(crate::tls::expiry)
            .unwrap_or_else(Instant::now);
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(16 << 10)
            .max_send_buffer_size(s.stream_send_buffer)
            .enable_push(false)
            .initial_max_send_streams(s.max_streams_per_connection)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| Error::H2 { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        {
            let closed = closed.clone();
            let (src, dst) = (key.src.clone(), key.dst.clone());
            let gauge = GaugeGuard::new(ProxyMetrics::gauge(
                &self.mesh.metrics.hbone_connections,
                "outbound",
            ));
            tokio::spawn(async move {
                let _gauge = gauge;
                if let Err(e) = connection.await {
                    debug!(%addr, "HBONE connection ended: {e}");
                }
                closed.store(true, Ordering::Release);
                debug!(%addr, %src, %dst, "HBONE connection closed");
            });
        }
        info!(%addr, src = %key.src, dst = %key.dst, "HBONE connection established");
        let max_streams = s
            .max_streams_per_connection
            .min(send.current_max_send_streams().max(1));
        Ok(Conn {
            send,
            streams: AtomicUsize::new(0),
            max_streams,
            idle_since: Mutex::new(Instant::now()),
            closed,
            fresh_until: own_expiry.min(peer_expiry),
        })
    }

    /// Closes connections idle for longer than `idle`, and a destination's idle connections
    /// beyond the first one kept once idle for longer than `surplus`; forgets empty keys.
    /// Returns how many connections were released.
    pub fn reap(&self, idle: Duration, surplus: Duration) -> usize {
        let mut released = 0;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| {
            // A slot being connected right now is busy, not idle.
            let Ok(mut conns) = slot.try_lock() else {
                return true;
            };
            let before = conns.len();
            let mut warm = false;
            conns.retain(|c| {
                if c.closed.load(Ordering::Acquire) {
                    return false;
                }
                if c.streams.load(Ordering::Acquire) > 0 {
                    return true;
                }
                let idle_for = c
                    .idle_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed();
                let keep = idle_for < if warm { surplus } else { idle };
                warm |= keep;
                keep
            });
            released += before - conns.len();
            !conns.is_empty()
        });
        released
    }

    /// Open pooled connections (for tests and metrics).
    pub fn connections(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.try_lock().map(|c| c.len()).unwrap_or(0))
            .sum()
    }
}
