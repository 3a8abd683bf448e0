//! The fenced module: every `unsafe` block and every namespace switch of this crate lives here.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sched::CloneFlags;

/// `NSFS_MAGIC` from linux/magic.h: the filesystem type of `/proc/*/ns/*` and their bind mounts.
const NSFS_MAGIC: i64 = 0x6e73_6673;

// NS_GET_NSTYPE = _IO(0xb7, 0x3) from linux/nsfs.h.
nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);

/// Returns `Ok(true)` when `fd` refers to a network namespace.
pub fn is_net_namespace(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = nix::sys::statfs::fstatfs(fd).map_err(io::Error::from)?;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Ok(false);
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the namespace type of an nsfs fd;
    // `fd` is borrowed, so it stays open for the duration of the call.
    let ty = unsafe { ns_get_nstype(fd.as_raw_fd()) }.map_err(io::Error::from)?;
    Ok(ty == libc::CLONE_NEWNET)
}

/// Opens the calling *thread's* current network namespace.
pub fn open_thread_netns() -> io::Result<OwnedFd> {
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}

/// Takes ownership of a descriptor received over SCM_RIGHTS.
///
/// # Safety contract (checked by callers)
/// `raw` must be a descriptor that was just installed in this process by `recvmsg` and that
/// nothing else owns; it is closed when the returned value drops.
pub fn owned_from_received(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `raw` in our fd table during recvmsg(SCM_RIGHTS); the caller
    // hands it over exactly once, so no other owner exists and it is not closed elsewhere.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Runs `f` with the calling thread switched into the network namespace `target`, then switches
/// back to the thread's original namespace before returning. `f` is synchronous: a namespace is
/// never held across an `.await`. Sockets created by `f` stay in `target`.
///
/// If switching back fails the thread is left in the wrong namespace, which would silently
/// corrupt every later socket it creates; the process aborts instead.
#[allow(clippy::disallowed_methods)]
pub fn run_in_netns<T>(target: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
    let original = open_thread_netns()?;
    nix::sched::setns(target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let out = f();
    if let Err(e) = nix::sched::setns(original.as_fd(), CloneFlags::CLONE_NEWNET) {
        eprintln!("fatal: cannot restore the thread's network namespace: {e}");
        std::process::abort();
    }
    Ok(out)
}

/// Hands the allocator's free memory back to the system (glibc `malloc_trim(0)`, which walks
/// every arena). glibc keeps freed memory in per-thread arenas, so without this an agent's RSS
/// stays at the peak of its busiest moment long after the connections are gone. Returns
/// whether memory was released. A no-op where the C library is not glibc.
pub fn trim_heap() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim has no preconditions: it takes the allocator's own locks and
        // only returns pages that hold no live allocation.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}
