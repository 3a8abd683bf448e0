//! The fenced module: every `unsafe` block and every namespace switch of this crate lives here.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
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
///
/// The thread's own namespace is opened once per thread and kept (opening
/// `/proc/thread-self/ns/net` took ~20 µs of the ~45 µs a switch costs, paid on every new
/// upstream connection). That is sound because every switch goes through here and returns the
/// thread to where it was; a nested switch (from inside `f`) opens the namespace it must go
/// back to, since that is not the thread's own.
#[allow(clippy::disallowed_methods)]
pub fn run_in_netns<T>(target: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
    thread_local! {
        static HOME: std::cell::OnceCell<OwnedFd> = const { std::cell::OnceCell::new() };
        static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    let nested = DEPTH.get() > 0;
    let switch = |original: BorrowedFd<'_>| -> io::Result<T> {
        nix::sched::setns(target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        DEPTH.set(DEPTH.get() + 1);
        let out = f();
        DEPTH.set(DEPTH.get() - 1);
        if let Err(e) = nix::sched::setns(original, CloneFlags::CLONE_NEWNET) {
            // Not `eprintln!`, which panics when stderr refuses the write (a full pipe, made
            // non-blocking by the agent): nothing may stand between this and the abort.
            let _ = writeln!(
                io::stderr(),
                "fatal: cannot restore the thread's network namespace: {e}"
            );
            std::process::abort();
        }
        Ok(out)
    };
    if nested {
        let original = open_thread_netns()?;
        return switch(original.as_fd());
    }
    HOME.with(|home| {
        if home.get().is_none() {
            let _ = home.set(open_thread_netns()?);
        }
        switch(home.get().expect("set above").as_fd())
    })
}

/// Stops glibc from returning freed memory to the system on every `free` and from mapping
/// each large buffer afresh: a relay frees and reallocates buffers of up to 128 KiB at line
/// rate, and with glibc's defaults every such cycle can end in `madvise(DONTNEED)` or
/// `munmap` and the next allocation in page faults that zero the same memory again
/// (measured: ~7,000 faults per second during one bulk transfer). Freed memory is handed
/// back instead by [`trim_heap`], which the agent calls on its reconcile pass. `trim` and
/// `mmap` are the thresholds in bytes (`M_TRIM_THRESHOLD`, `M_MMAP_THRESHOLD`). A no-op
/// where the C library is not glibc.
pub fn tune_heap(trim: usize, mmap: usize) -> bool {
    #[cfg(target_env = "gnu")]
    {
        let clamp = |v: usize| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets allocator parameters; any value is accepted or refused
        // (return 0) by glibc itself.
        let t = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, clamp(trim)) };
        // SAFETY: as above.
        let m = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, clamp(mmap)) };
        t == 1 && m == 1
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = (trim, mmap);
        false
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The epoll instance watching a descriptor is found among others (as a duplicate of the
    /// same instance: events registered in it show through the duplicate), and whether it
    /// has an event ready is read without taking the event.
    #[test]
    fn finds_the_epoll_instance_watching_a_descriptor() {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
        let (r, w) = nix::unistd::pipe().unwrap();
        let (other_r, _other_w) = nix::unistd::pipe().unwrap();
        let decoy = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        decoy
            .add(&other_r, EpollEvent::new(EpollFlags::EPOLLIN, 1))
            .unwrap();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let edge = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        epoll.add(&r, EpollEvent::new(edge, 7)).unwrap();

        let found = epoll_watching(r.as_fd()).unwrap().expect("found");
        assert!(epoll_watches(found.as_raw_fd(), r.as_raw_fd()));
        assert!(!epoll_watches(found.as_raw_fd(), other_r.as_raw_fd()));
        assert!(
            epoll_watching(w.as_fd()).unwrap().is_none(),
            "nothing watches w"
        );

        assert!(!readable_now(found.as_fd()), "no event yet");
        nix::unistd::write(&w, b"x").unwrap();
        assert!(readable_now(found.as_fd()), "an event is ready");
        assert!(
            readable_now(found.as_fd()),
            "and still there: poll took nothing"
        );
        // The edge-triggered event is still there for the instance's owner to collect.
        let mut events = [EpollEvent::empty(); 1];
        assert_eq!(epoll.wait(&mut events, EpollTimeout::ZERO).unwrap(), 1);
        assert_eq!(events[0].data(), 7);
        assert!(!readable_now(found.as_fd()), "collected");
    }

    /// The inode of the calling thread's network namespace.
    fn current() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    }

    /// A new, empty network namespace (made on a short-lived thread, kept by its fd).
    #[allow(clippy::disallowed_methods)]
    fn new_netns() -> OwnedFd {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
            open_thread_netns().unwrap()
        })
        .join()
        .unwrap()
    }

    fn ino(fd: &OwnedFd) -> u64 {
        nix::sys::stat::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn switches_return_home_even_when_nested() {
        let (a, b) = (new_netns(), new_netns());
        let home = current();
        for _ in 0..3 {
            let (in_a, in_b, back_in_a) = run_in_netns(a.as_fd(), || {
                let in_b = run_in_netns(b.as_fd(), current).unwrap();
                (current(), in_b, current())
            })
            .unwrap();
            assert_eq!((in_a, in_b, back_in_a), (ino(&a), ino(&b), ino(&a)));
            assert_eq!(current(), home, "back in the thread's own namespace");
        }
    }
}

// ---- bpf(2): the same-node shortcut's map and program (see `crate::sockmap`). Written by
// hand because the BPF loaders for Rust (aya, libbpf-rs) load programs from ELF objects,
// which need a BPF toolchain (clang, or bpf-linker on nightly) this project does not build
// with; the program is 21 instructions, assembled in `sockmap.rs`.

/// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

/// `BPF_MAP_TYPE_SOCKHASH`.
pub const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
/// `BPF_PROG_TYPE_SK_MSG`.
pub const BPF_PROG_TYPE_SK_MSG: u32 = 16;
/// `BPF_SK_MSG_VERDICT`.
pub const BPF_SK_MSG_VERDICT: u32 = 7;

/// One instruction (`struct bpf_insn`): opcode, dst (low nibble) and src (high nibble)
/// registers, offset, immediate.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BpfInsn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// `bpf(cmd, attr, sizeof attr)`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed `repr(C)` prefix of `union bpf_attr` for
    // `cmd` (the kernel zero-extends a shorter attr), and its size is passed with it; the
    // pointers inside it (if any) are set by the callers to buffers that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Takes ownership of a descriptor the kernel just returned.
fn owned_bpf(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` is a new descriptor returned by bpf(2), owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// A BPF map.
pub fn bpf_map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries: entries,
        ..Default::default()
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned_bpf)
}

/// Puts `value` at `key` in `map` (`BPF_ANY`). For a sockmap or sockhash the value is a socket
/// descriptor.
pub fn bpf_map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapUpdate {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Loads a program; on refusal the verifier's log is the error.
pub fn bpf_prog_load(
    prog_type: u32,
    insns: &[BpfInsn],
    license: &std::ffi::CStr,
) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 64 << 10];
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).map(owned_bpf).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!("{e}: {}", String::from_utf8_lossy(&log[..end]).trim()),
        )
    })
}

/// Attaches `prog` to `target` (for `BPF_SK_MSG_VERDICT`, a sockmap or sockhash).
pub fn bpf_prog_attach(target: &OwnedFd, prog: &OwnedFd, attach_type: u32) -> io::Result<()> {
    let mut attr = ProgAttach {
        target_fd: target.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

// ---- Polling before parking (see `ambit_proxy::workers`). tokio does not expose its I/O
// driver's epoll descriptor, so it is found the way `ss` and `lsof` find such things: the
// kernel lists every descriptor an epoll instance watches in `/proc/self/fdinfo` (`tfd:`).

/// A new descriptor for this process's epoll instance that watches `fd` (the same instance,
/// duplicated), or `None` if no instance does. The caller registers `fd` with exactly one.
pub fn epoll_watching(fd: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(n) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if !epoll_watches(n, fd.as_raw_fd()) {
            continue;
        }
        // SAFETY: F_DUPFD_CLOEXEC reads no memory of ours; on a descriptor closed since the
        // scan it fails with EBADF. It may have been closed and reused by another thread,
        // which is why the duplicate is checked again below before it is used.
        let dup = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: fcntl just created `dup`; nothing else owns it.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        if epoll_watches(dup.as_raw_fd(), fd.as_raw_fd()) {
            return Ok(Some(dup));
        }
    }
    Ok(None)
}

/// Whether descriptor `n` of this process is an epoll instance watching descriptor `fd`.
pub fn epoll_watches(n: RawFd, fd: RawFd) -> bool {
    let link = std::fs::read_link(format!("/proc/self/fd/{n}"));
    if link.ok().as_deref() != Some(std::path::Path::new("anon_inode:[eventpoll]")) {
        return false;
    }
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{n}")) else {
        return false;
    };
    // e.g. "tfd:        9 events:       19 data:  ..."
    info.lines().any(|l| {
        l.strip_prefix("tfd:")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|t| t.parse::<RawFd>().ok())
            == Some(fd)
    })
}

/// Whether `fd` is readable right now (`poll(2)` with no timeout). On an epoll instance:
/// whether it has events ready, without taking them (an `epoll_wait` would).
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// If `fd` is a pipe (or FIFO), makes writes to it non-blocking and returns true; anything
/// else (a file, a terminal: whose file description a parent shell may share) is left alone.
/// Used on the agent's stderr, which in a cluster is a pipe read by the container runtime: a
/// stalled reader must cost log lines, never a blocked data-path thread.
pub fn nonblocking_if_pipe(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use nix::sys::stat::{SFlag, fstat};
    let st = fstat(fd).map_err(io::Error::from)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
        return Ok(false);
    }
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(true)
}

/// `IP_LOCAL_PORT_RANGE` from linux/in.h (Linux 6.3+; not in the `libc` crate yet).
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

/// Narrows the ports `connect` may pick for the socket `fd` (bound with
/// `IP_BIND_ADDRESS_NO_PORT`, or not bound) to `low..=high`, within the namespace's
/// `net.ipv4.ip_local_port_range` (the kernel keeps the namespace's bound wherever the given one
/// lies outside it). With `low == high` the socket connects from that port when the 4-tuple is
/// free there and `connect` fails with `EADDRNOTAVAIL` when it is not; unlike a `bind` to the
/// port, the port is then shared the way a port `connect` picked is, so it does not take the
/// port from other sockets' `connect`. Fails with `ENOPROTOOPT` before Linux 6.3.
pub fn set_local_port_range(fd: BorrowedFd<'_>, low: u16, high: u16) -> io::Result<()> {
    let range: u32 = (u32::from(high) << 16) | u32::from(low);
    // SAFETY: `range` is a live u32 for the duration of the call and its size is the length
    // passed; setsockopt only reads it. `fd` is a borrowed, open descriptor.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_LOCAL_PORT_RANGE,
            (&raw const range).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
