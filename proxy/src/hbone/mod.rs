//! HBONE: TCP carried as HTTP/2 CONNECT streams inside mutual TLS 1.3, to port 15008 of the
//! destination pod. The wire contract is Istio ambient's (ztunnel interoperates both ways):
//! ALPN `h2`, `:authority` = destination pod IP and port, SPIFFE identities in URI SANs.

pub mod client;
pub mod server;
pub mod stream;

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

pub use stream::Tunnel;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("{addr} answered CONNECT with {status}")]
    Status {
        addr: SocketAddr,
        status: http::StatusCode,
    },
    #[error("{what} with {addr} timed out")]
    Timeout {
        addr: SocketAddr,
        what: &'static str,
    },
    #[error("the app's connection failed before the CONNECT answer: {0}")]
    App(io::Error),
    #[error("no certificate for {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Copies both ways between a TCP socket and an HBONE stream until both directions ended.
/// Returns (bytes TCP→stream, bytes stream→TCP). On failure the stream is reset (dropped
/// unfinished) and the TCP connection aborted (RST), so a reset on one side is a reset on the
/// other.
pub async fn relay(
    tcp: &mut TcpStream,
    tunnel: Tunnel,
    buffer: usize,
) -> Result<(u64, u64), io::Error> {
    match stream::copy(tcp, tunnel, buffer).await {
        Ok(n) => Ok(n),
        Err(e) => {
            abort(tcp);
            Err(e)
        }
    }
}

/// Makes the socket's close a reset (SO_LINGER 0): the peer sees the connection fail.
pub fn abort(tcp: &TcpStream) {
    let _ = SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Puts an HBONE socket between two pods of this node in the same-node shortcut's map
/// ([`ambit_common::sockmap`]), before it reads or writes a byte: once both ends are in, each
/// TLS record goes socket to socket instead of through both pods' TCP stacks and the bridge.
/// Order: the client joins right after `connect`, before its ClientHello; the server joins
/// before its first read. The ClientHello may still take TCP (the server not in yet), and is
/// read before anything redirected can arrive: the client sends nothing more until the
/// server's answer. A failure leaves the socket on TCP.
pub(crate) fn join_shortcut(
    mesh: &crate::mesh::Mesh,
    tcp: &tokio::net::TcpStream,
    peer: std::net::IpAddr,
) {
    let Some(shortcut) = &mesh.shortcut else {
        return;
    };
    // Only both ends here can meet in the map; a remote peer's socket would run the program
    // on every send for nothing.
    if !mesh.directory.is_local(peer) {
        return;
    }
    let (Ok(local), Ok(remote)) = (tcp.local_addr(), tcp.peer_addr()) else {
        return;
    };
    let result = match shortcut.add(tcp, local, remote) {
        Ok(true) => "joined",
        Ok(false) => "ipv6",
        Err(e) => {
            tracing::debug!(%local, %remote, "HBONE socket stays on TCP: {e}");
            "failed"
        }
    };
    mesh.metrics.shortcut(result);
}
