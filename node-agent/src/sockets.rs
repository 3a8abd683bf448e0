//! Every socket of a pod is created inside the pod's network namespace by the agent, so it
//! belongs to the agent's cgroup and the agent's exemption table lets it through (see
//! [`crate::cgroup`]).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use ambit_common::netns::Netns;
use ambit_common::sys;
use ambit_proxy::socket::SocketFactory;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;

pub struct InPodSockets {
    pub netns: Arc<Netns>,
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

/// This kernel's answer to `IP_LOCAL_PORT_RANGE` (Linux 6.3+, [`sys::set_local_port_range`]).
static PORT_RANGE: PortRange = PortRange::new();

/// Remembers a kernel's refusal of `IP_LOCAL_PORT_RANGE` (`ENOPROTOOPT`, before Linux 6.3, which
/// many nodes still run), so such a kernel costs one failed `setsockopt` per agent instead of
/// one per inbound HBONE connection, and the operator reads why apps see other ports once.
struct PortRange {
    refused: std::sync::atomic::AtomicBool,
}

impl PortRange {
    const fn new() -> Self {
        Self {
            refused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes `port` the socket's only source port through `set` (the `setsockopt`), unless the
    /// kernel refused the option before. Returns whether it was set.
    fn narrow(&self, port: u16, set: impl FnOnce(u16) -> io::Result<()>) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.refused.load(Relaxed) {
            return false;
        }
        let Err(e) = set(port) else {
            return true;
        };
        if e.raw_os_error() == Some(nix::errno::Errno::ENOPROTOOPT as i32) {
            if !self.refused.swap(true, Relaxed) {
                tracing::info!(
                    "this kernel has no IP_LOCAL_PORT_RANGE (Linux 6.3+): apps see inbound HBONE \
                     connections from a port of their own pod's kernel, not their client's ({e})"
                );
            }
        } else {
            tracing::debug!("the source port {port} is left to connect: {e}");
        }
        false
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
            if let Some(src) = source {
                // IP_TRANSPARENT alone lets the socket bind an address that is not the pod's
                // (the kernel's non-local bind check accepts transparent, free-bind or the
                // sysctl): IP_FREEBIND beside it, as ztunnel sets, would be one more
                // `setsockopt` per connection for nothing.
                match src {
                    SocketAddr::V4(_) => s.set_ip_transparent_v4(true)?,
                    SocketAddr::V6(_) => s.set_ip_transparent_v6(true)?,
                }
                // The port is picked at connect time, from the full 4-tuple: a bind to port 0
                // would reserve a port unique across every socket of the namespace, a search
                // that grows with the TIME_WAIT sockets of past connections (measured: 85% of
                // the agent's CPU during a new-connection benchmark) and that exhausts the
                // ephemeral range under churn. Best effort (Linux 4.2+).
                let _ = nix::sys::socket::setsockopt(
                    &s,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                );
                if src.port() != 0 {
                    // A given port is `connect`'s only choice (a one-port range), not bound:
                    // a port bound by `bind` is skipped by every `connect` of the namespace
                    // that picks a port, for as long as a socket (TIME_WAIT included) holds
                    // it; one `connect` took is shared wherever the 4-tuple differs. Best
                    // effort (Linux 6.3+): without it `connect` picks as for port 0.
                    PORT_RANGE.narrow(src.port(), |port| {
                        sys::set_local_port_range(s.as_fd(), port, port)
                    });
                }
                s.bind(&SocketAddr::new(src.ip(), 0).into())?;
            }
            Ok(TcpSocket::from_std_stream(s.into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};

    use super::*;

    /// A socket to an app is non-blocking as created (the runtime needs it so; it is no
    /// longer switched after creation), with and without a transparent source address. As
    /// root (entering a namespace, even one's own, and transparent sockets need it).
    #[test]
    fn sockets_to_apps_are_created_non_blocking() {
        let f = InPodSockets {
            netns: Arc::new(Netns::current_thread().unwrap()),
        };
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

    /// A kernel that refuses `IP_LOCAL_PORT_RANGE` is asked once, not per connection; any
    /// other failure leaves the next connection asking again.
    #[test]
    fn a_kernel_without_the_port_range_option_is_asked_once() {
        let range = PortRange::new();
        let calls = std::cell::Cell::new(0);
        let refuse = |errno| {
            let calls = &calls;
            move |_| {
                calls.set(calls.get() + 1);
                Err(io::Error::from_raw_os_error(errno as i32))
            }
        };
        assert!(!range.narrow(40000, refuse(nix::errno::Errno::EINVAL)));
        assert!(!range.narrow(40001, refuse(nix::errno::Errno::EINVAL)));
        assert_eq!(calls.get(), 2, "another error is no verdict on the kernel");
        assert!(!range.narrow(40002, refuse(nix::errno::Errno::ENOPROTOOPT)));
        assert!(!range.narrow(40003, refuse(nix::errno::Errno::ENOPROTOOPT)));
        assert!(!range.narrow(40004, refuse(nix::errno::Errno::ENOPROTOOPT)));
        assert_eq!(
            calls.get(),
            3,
            "asked again after the kernel said it has no such option"
        );
        // A kernel that takes it: set every time.
        let takes = PortRange::new();
        let mut set = Vec::new();
        for port in [40005, 40006] {
            assert!(takes.narrow(port, |p| {
                set.push(p);
                Ok(())
            }));
        }
        assert_eq!(set, [40005, 40006]);
    }

    /// A given source port is the one `connect` takes where the 4-tuple is free, and
    /// `connect` fails with `EADDRNOTAVAIL` where it is not (the same 4-tuple open, the port
    /// bound by a listener) — the caller then asks for none. As root.
    #[tokio::test]
    async fn a_given_source_port_is_the_only_one_connect_takes() {
        let f = InPodSockets {
            netns: Arc::new(Netns::current_thread().unwrap()),
        };
        let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = app.local_addr().unwrap();
        // A port of the namespace's ephemeral range, free now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let source = SocketAddr::from(([127, 0, 0, 2], port));
        let first = f.upstream(dst, Some(source)).unwrap().connect(dst).await;
        let first = first.unwrap();
        assert_eq!(first.local_addr().unwrap(), source);
        let again = f.upstream(dst, Some(source)).unwrap().connect(dst).await;
        let e = again.expect_err("the same 4-tuple twice");
        assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable, "{e}");
        // Another destination from the same port: a different 4-tuple.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = other.local_addr().unwrap();
        let second = f.upstream(to, Some(source)).unwrap().connect(to).await;
        assert_eq!(second.unwrap().local_addr().unwrap(), source);
        drop(first);
        // A port a listener holds.
        let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let source = SocketAddr::from(([127, 0, 0, 2], held.local_addr().unwrap().port()));
        let e = f.upstream(dst, Some(source)).unwrap().connect(dst).await;
        let e = e.expect_err("a port a listener holds");
        assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable, "{e}");
    }
}
