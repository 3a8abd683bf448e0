//! Socket creation is delegated to a factory; socket options live here.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

/// Creates sockets in the right network namespace.
pub trait SocketFactory: Send + Sync + 'static {
    /// A non-blocking listener bound to `port` on every address of the pod.
    fn listener(&self, port: u16) -> io::Result<std::net::TcpListener>;
    /// An unconnected socket for `dst`; when `source` is set the socket is transparent and bound
    /// to that (non-local) address, so the peer sees the original client IP. Its port is left
    /// to `connect`; a source port other than 0 is the one `connect` must take, if the 4-tuple
    /// is free there and the port lies in the namespace's ephemeral range (else `connect`
    /// fails with `EADDRNOTAVAIL`; outside the range it picks as for port 0) — never bound
    /// beforehand, which would keep the port from every other socket's `connect` for as long
    /// as the connection and its TIME_WAIT last.
    fn upstream(&self, dst: SocketAddr, source: Option<SocketAddr>) -> io::Result<TcpSocket>;
}

/// Caps the kernel receive buffer of a socket whose peer is an app in the same pod.
///
/// Why: while HTTP/2 flow control holds a stream, the agent stops reading its app socket and
/// the kernel buffers for it instead. Autotuning grows such a buffer to `tcp_rmem`'s maximum
/// (32 MiB on many hosts), so 1,000 busy connections queue gigabytes and push the host past
/// `net.ipv4.tcp_mem`'s pressure threshold; under pressure a socket holding more than its share
/// drops arriving segments (TcpExtTCPRcvQDrop), and the senders' congestion control (BBR
/// collapsed to kbit/s) turns that into connections stalled for minutes. A socket under its
/// share keeps receiving. The peer is in the same namespace (round trip in microseconds), so a
/// fixed buffer of a few hundred KiB costs no throughput. Sockets facing the network (HBONE,
/// passthrough to remote destinations, plaintext from outside the mesh) keep autotuning: their
/// round trips need large windows.
///
/// On a listener, set it before the first connection arrives: each accepted socket copies the
/// listener's buffer and chooses its window scale from it. On an outgoing socket, set it before
/// `connect()`. `bytes == 0` keeps autotuning.
pub fn limit_receive_buffer(sock: SockRef<'_>, bytes: usize) -> io::Result<()> {
    if bytes > 0 {
        sock.set_recv_buffer_size(bytes)?;
    }
    Ok(())
}

/// Sets a socket's congestion control when `name` is set; best effort (the agent checked at
/// startup that the kernel has it, see [`congestion_control_available`]), so a refusal leaves
/// the namespace's default.
///
/// Used for the sockets whose peer is an app in the same pod (`--app-congestion-control`,
/// cubic by default) and, only when an operator asks, the HBONE sockets
/// (`--hbone-congestion-control`). Why the app-facing ones: many nodes default to BBR, which
/// paces every socket. With no `fq` qdisc (a pod's loopback has none) the kernel paces in TCP
/// itself, one high-resolution timer per burst, each timer a softirq that sends the next burst;
/// on a VM arming one is an exit to the hypervisor. A peer in the same namespace needs no
/// pacing: it is microseconds away over a path that drops nothing. Measured across nodes on
/// BBR nodes (ARCHITECTURE.md, "What the data path does per byte"). The sockets facing the
/// network (HBONE, passthrough to remote destinations, plaintext from outside the mesh) keep
/// the namespace's choice by default: their congestion control is the operator's, for a real
/// network.
///
/// On a listener, set it before the first connection arrives (an accepted socket keeps the
/// congestion control its listener was given); on an outgoing socket, before `connect()`.
pub fn set_congestion_control(sock: SockRef<'_>, name: Option<&str>) {
    if let Some(name) = name {
        if let Err(e) = sock.set_tcp_congestion(name.as_bytes()) {
            debug!("congestion control {name:?} refused, the namespace's default stays: {e}");
        }
    }
}

/// Before `connect()` to an app, when the client's first bytes are already in hand: the
/// handshake's last ACK is held back (`TCP_QUICKACK` off, the kernel's delayed-ACK mode), so it
/// rides with those bytes, written right after `connect` returns, instead of a segment of its
/// own. One segment through the pod's stack fewer per connection, and the app's `accept` finds
/// the connection with its first bytes (one wake-up of the app, not two). Only with bytes in
/// hand: with nothing to send, the ACK would wait for the delayed-ACK timer (~200 ms after a
/// handshake) and the app would not see the connection until then. [`ack_promptly`] undoes it
/// after the first write. Best effort: a refusal only costs the segment.
pub fn hold_handshake_ack(sock: SockRef<'_>) {
    let _ = sock.set_tcp_quickack(false);
}

/// After the first write on a socket [`hold_handshake_ack`] set up: back to the kernel's usual
/// acknowledgements (quick ones at the start of a connection), so an app that writes its answer
/// in pieces with Nagle's algorithm on is not held up by an ACK delayed for a write of ours
/// that may never come.
pub fn ack_promptly(sock: SockRef<'_>) {
    let _ = sock.set_tcp_quickack(true);
}

/// Whether the kernel lets this process give its sockets the congestion control `name`
/// (tried on a socket of its own: the algorithms are the kernel's, the same in every
/// namespace; the agent's `CAP_NET_ADMIN` lifts `net.ipv4.tcp_allowed_congestion_control`).
pub fn congestion_control_available(name: &str) -> io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_tcp_congestion(name.as_bytes())
}

/// The destination a connection had before REDIRECT rewrote it; `peer` is its source as
/// `accept` gave it (which family to ask for; taken from the caller, not `getpeername`, which
/// would be one more system call per connection).
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = if canonical(peer).is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP"))
}

/// Maps `[::ffff:a.b.c.d]:p` (seen on dual-stack listeners) to `a.b.c.d:p`.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// reno is built into every kernel; a name no kernel has is refused with ENOENT, which the
    /// agent reports at startup before keeping the pods' default. The name set is one that
    /// differs from the socket's default (reno or cubic, whichever the default is not), so the
    /// read-back shows the setter's work, not the machine's default.
    #[test]
    fn a_congestion_control_the_kernel_lacks_is_refused() {
        congestion_control_available("reno").unwrap();
        let e = congestion_control_available("no_such_cc").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // The kernel answers with its whole name buffer, NUL-padded.
        let cc = |s: &socket2::Socket| {
            let name = s.tcp_congestion().unwrap();
            String::from_utf8(name.split(|&b| b == 0).next().unwrap().to_vec()).unwrap()
        };
        let default = cc(&s);
        let other = ["reno", "cubic"]
            .into_iter()
            .find(|&n| n != default && congestion_control_available(n).is_ok())
            .expect("reno or cubic, other than the default, available");
        set_congestion_control((&s).into(), Some(other));
        assert_eq!(cc(&s), other);
        set_congestion_control((&s).into(), Some("no_such_cc"));
        assert_eq!(cc(&s), other, "a refusal changes nothing");
    }

    #[test]
    fn v4_mapped_addresses_become_v4() {
        let m: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(canonical(m), "10.1.2.3:80".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
