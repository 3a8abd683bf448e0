//! The benchmark's system calls (through nix's safe wrappers; no `unsafe` here): CPU
//! affinity, per-thread usage, and the kernel TLS spike's socket options and splice.

use std::net::TcpStream;
use std::os::fd::AsFd;

use nix::fcntl::{SpliceFFlags, splice};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::socket::{setsockopt, sockopt};

/// Pins the calling thread to CPU 0.
pub fn pin_thread() {
    let mut set = nix::sched::CpuSet::new();
    let _ = set.set(0);
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

/// CPU seconds and context switches (voluntary and involuntary) of the calling thread so far.
pub fn thread_usage() -> nix::Result<(f64, u64)> {
    let u = getrusage(UsageWho::RUSAGE_THREAD)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok((
        secs(u.user_time()) + secs(u.system_time()),
        (u.voluntary_context_switches() + u.involuntary_context_switches()) as u64,
    ))
}

/// Puts the kernel's TLS layer on an established TCP socket (`TCP_ULP` "tls"); the keys
/// come after, [`tls_keys`].
pub fn tls_ulp(sock: &TcpStream) -> nix::Result<()> {
    setsockopt(sock, sockopt::TcpUlp::default(), b"tls")
}

/// Gives the kernel's TLS layer the keys of each direction (`TLS_TX`, `TLS_RX`).
pub fn tls_keys(
    sock: &TcpStream,
    tx: &sockopt::TlsCryptoInfo,
    rx: &sockopt::TlsCryptoInfo,
) -> Result<(), (&'static str, nix::Error)> {
    setsockopt(sock, sockopt::TcpTlsTx, tx).map_err(|e| ("TLS_TX", e))?;
    setsockopt(sock, sockopt::TcpTlsRx, rx).map_err(|e| ("TLS_RX", e))
}

/// A pipe: (read end, write end), for [`splice_through`].
pub fn pipe() -> nix::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    nix::unistd::pipe()
}

/// Moves up to `len` bytes from `from` to `to` through the pipe `(r, w)` without copying
/// them into user space; 0 at `from`'s end.
pub fn splice_through(
    from: impl AsFd,
    (r, w): (&impl AsFd, &impl AsFd),
    to: impl AsFd,
    len: usize,
) -> nix::Result<usize> {
    let n = splice(from, None, w, None, len, SpliceFFlags::SPLICE_F_MOVE)?;
    let mut left = n;
    while left > 0 {
        left -= splice(r, None, &to, None, left, SpliceFFlags::SPLICE_F_MOVE)?;
    }
    Ok(n)
}
