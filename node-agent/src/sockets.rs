//! Every socket of a pod is created inside the pod's network namespace by the agent, so it
//! belongs to the agent's cgroup and the agent's exemption table lets it through (see
//! [`crate::cgroup`]).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, OnceLock};

use ambit_common::netns::Netns;
use ambit_proxy::socket::SocketFactory;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;

pub struct InPodSockets {
    netns: Arc<Netns>,
    /// The namespace's `net.ipv4.ip_local_port_range`, read when a socket is first given a
    /// source port ([`SocketFactory::upstream`]).
    ephemeral: OnceLock<RangeInclusive<u16>>,
}

impl InPodSockets {
    pub fn new(netns: Arc<Netns>) -> Self {
        Self {
            netns,
            ephemeral: OnceLock::new(),
        }
    }

    /// Whether `port` is one the kernel could pick for a connection of the namespace; read in
    /// it (so from inside [`in_ns`]). A source port outside that range is not bound: a client
    /// could otherwise name a port an app of the pod is about to listen on and hold it for as
    /// long as its connection lasts. Unreadable: Linux's default range.
    fn ephemeral(&self, port: u16) -> bool {
        self.ephemeral
            .get_or_init(|| {
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                    .ok()
                    .and_then(|s| parse_port_range(&s))
                    .unwrap_or(32768..=60999)
            })
            .contains(&port)
    }
}

/// `ip_local_port_range`'s "low<whitespace>high".
fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (it.next()?.ok()?, it.next()?.ok()?);
    (it.next().is_none() && low <= high).then_some(low..=high)
}

/// `net.ipv4.tcp_migrate_req` of the namespace the calling thread is in (Linux 5.14+): when an
/// agent closes its listeners (drain during an upgrade), connections already queued on them
/// move to the other agent's listener of the same SO_REUSEPORT group instead of being reset.
/// `/proc/sys/net` resolves to the opening thread's namespace. Best effort: on an older kernel
/// the handover still works, with a small window for resets.
fn migrate_requests() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
        tracing::debug!("net.ipv4.tcp_migrate_req not set in the pod namespace: {e}");
    }
}

fn in_ns<T>(ns: &Netns, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    ns.run(f).map_err(io::Error::other)?
}

impl SocketFactory for InPodSockets {
    fn listener(&self, port: u16) -> io::Result<std::net::TcpListener> {
        in_ns(&self.netns, || {
            migrate_requests();
            // Dual-stack where the pod has IPv6, IPv4 only where it has not.
            let (s, addr) = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
                .and_then(|s| {
                    s.set_only_v6(false)?;
                    Ok(s)
                }) {
                Ok(s) => (s, SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)),
                Err(_) => (
                    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?,
                    SocketAddr::from(([0, 0, 0, 0], port)),
                ),
            };
            s.set_reuse_address(true)?;
            // A new agent can bind beside the old one during an upgrade.
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(s.into())
        })
    }

    fn upstream(&self, dst: SocketAddr, source: Option<SocketAddr>) -> io::Result<TcpSocket> {
        in_ns(&self.netns, || {
            let domain = if dst.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            // Non-blocking from the start: `set_nonblocking` after would cost two `fcntl`
            // calls on every connection.
            let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
            if let Some(mut src) = source {
                if src.port() != 0 && !self.ephemeral(src.port()) {
                    src.set_port(0);
                }
                // IP_TRANSPARENT alone lets the socket bind an address that is not the pod's
                // (the kernel's non-local bind check accepts transparent, free-bind or the
                // sysctl): IP_FREEBIND beside it, as ztunnel sets, would be one more
                // `setsockopt` per connection for nothing.
                match src {
                    SocketAddr::V4(_) => s.set_ip_transparent_v4(true)?,
                    SocketAddr::V6(_) => s.set_ip_transparent_v6(true)?,
                }
                if src.port() == 0 {
                    // The port is picked at connect time, from the full 4-tuple: a bind to
                    // port 0 would reserve a port unique across every socket of the
                    // namespace, a search that grows with the TIME_WAIT sockets of past
                    // connections (measured: 85% of the agent's CPU during a new-connection
                    // benchmark) and that exhausts the ephemeral range under churn. Best
                    // effort (Linux 4.2+).
                    let _ = nix::sys::socket::setsockopt(
                        &s,
                        nix::sys::socket::sockopt::IpBindAddressNoPort,
                        &true,
                    );
                } else {
                    // A given port (the client's own, see `ambit_proxy::hbone::server`) is
                    // bound without any search; the TIME_WAIT sockets left by earlier
                    // connections from it (every one of ours has this flag) do not hold it.
                    s.set_reuse_address(true)?;
                }
                s.bind(&src.into())?;
            }
            Ok(TcpSocket::from_std_stream(s.into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::fcntl::{FcntlArg, OFlag, fcntl};

    use super::*;

    /// A socket to an app is non-blocking as created (the runtime needs it so; it is no
    /// longer switched after creation), with and without a transparent source address. As
    /// root (entering a namespace, even one's own, and transparent sockets need it).
    #[test]
    fn sockets_to_apps_are_created_non_blocking() {
        let f = InPodSockets::new(Arc::new(Netns::current_thread().unwrap()));
        let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for source in [None, Some(SocketAddr::from(([127, 0, 0, 2], 0)))] {
            let s = f.upstream(dst, source).unwrap();
            let flags = OFlag::from_bits_truncate(fcntl(s.as_fd(), FcntlArg::F_GETFL).unwrap());
            assert!(
                flags.contains(OFlag::O_NONBLOCK),
                "source {source:?}: {flags:?}"
            );
        }
    }

    /// A source port the kernel could have picked for the namespace is bound as given, beside
    /// another unconnected socket from the same port (two connections from one client port to
    /// two destinations); one a listener of the namespace holds fails with `EADDRINUSE` (the
    /// HBONE server then asks for none); one outside the ephemeral range is left to `connect`.
    /// As root.
    #[test]
    fn a_source_port_is_bound_only_within_the_ephemeral_range() {
        let f = InPodSockets::new(Arc::new(Netns::current_thread().unwrap()));
        let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let ip = IpAddr::from([127, 0, 0, 2]);
        // An ephemeral port, held by a listener on every address.
        let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let source = SocketAddr::new(ip, port);
        let e = f.upstream(dst, Some(source)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(listener);
        let first = f.upstream(dst, Some(source)).unwrap();
        let second = f
            .upstream("127.0.0.1:10".parse().unwrap(), Some(source))
            .unwrap();
        for s in [&first, &second] {
            assert_eq!(s.local_addr().unwrap(), source);
        }
        let range = f.ephemeral.get().expect("read with the first port").clone();
        assert!(range.contains(&port), "{range:?}");
        let below = range.start() - 1;
        let s = f.upstream(dst, Some(SocketAddr::new(ip, below))).unwrap();
        assert_eq!(
            s.local_addr().unwrap(),
            SocketAddr::new(ip, 0),
            "port {below}"
        );
    }

    #[test]
    fn the_port_range_reads_as_the_kernel_writes_it() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("1024 1024"), Some(1024..=1024));
        for bad in ["", "60999 32768", "1 2 3", "a b", "70000 70001"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
    }
}
