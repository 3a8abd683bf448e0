//! The same-node shortcut: socket-to-socket delivery between two sockets of this host that
//! are each other's peers, with an `sk_msg` program on a sockhash.
//!
//! A socket put in the [`Redirect`]'s map runs the program on every `sendmsg`: it looks up
//! the socket's peer (the reversed 4-tuple) in the same map and, if there, moves the message
//! straight into the peer's receive queue (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`): no
//! segmentation, checksums, netfilter, veth or bridge, no ACKs. A socket whose peer is not in
//! the map (another host, or not added yet) sends through TCP as before. Measured on one pair
//! (`ambit-bench --sockmap-spike`, ARCHITECTURE.md): 2x the throughput of one stream at
//! 0.4x the CPU per GB, over loopback and over veth alike.
//!
//! Order: a socket's bytes that took TCP before its peer joined the map are read before the
//! peer's redirected ones only if the reader drained them first (the kernel reads the
//! redirected queue first when both hold data). Callers add both sockets before either
//! writes, or rely on a protocol where the first sender waits for an answer (a TLS client's
//! ClientHello) — see `ambit_proxy::hbone`.
//!
//! Memory: the kernel does not bound what redirection queues at a peer that stops reading —
//! no receive buffer, no window; measured on this project's test machine (Linux 6.18), one
//! writer queued 2.3 GB at a reader that read nothing before `sendmsg` failed with ENOMEM at
//! `net.ipv4.tcp_mem`, i.e. with every TCP socket of the host under memory pressure. So only
//! sockets whose protocol has flow control of its own may join: HBONE (HTTP/2 stream and
//! connection windows bound what a sender has in flight). An app's socket may not (see
//! ARCHITECTURE.md, "The app legs keep TCP, on purpose").

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::sys::{self, BpfInsn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the sockhash: {0} (needs CONFIG_BPF_STREAM_PARSER and CAP_BPF)")]
    Map(#[source] std::io::Error),
    #[error("loading the sk_msg program: {0}")]
    Load(#[source] std::io::Error),
    #[error("attaching the sk_msg program to the sockhash: {0}")]
    Attach(#[source] std::io::Error),
    #[error("adding a socket to the sockhash: {0}")]
    Add(#[source] std::io::Error),
}

/// Sockets the map holds at most (an addition beyond fails and that socket keeps TCP).
const ENTRIES: u32 = 65_536;

/// Offsets in `struct sk_msg_md`.
const MD_REMOTE_IP4: i16 = 20;
const MD_LOCAL_IP4: i16 = 24;
const MD_REMOTE_PORT: i16 = 60;
const MD_LOCAL_PORT: i16 = 64;
/// `BPF_FUNC_msg_redirect_hash`.
const FUNC_MSG_REDIRECT_HASH: i32 = 71;
const BPF_F_INGRESS: i32 = 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const KEY_SIZE: u32 = 16;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The verdict program: the key of the peer socket, as [`key`] builds it for that socket, is
/// (our remote ip, our local ip, our remote port as the kernel stores it, our local port);
/// redirect the message into that socket's receive queue, or let it take TCP when the peer is
/// not in the map (`SK_DROP` from the helper becomes `SK_PASS`).
fn program(map: &OwnedFd) -> Vec<BpfInsn> {
    const LDXW: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const STXW: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
    const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const LD_DW: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    const FP: u8 = 10;
    const JLE_K: u8 = 0xb5; // BPF_JMP | BPF_JLE | BPF_K
    const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
    let mut p = vec![insn(MOV_X, 6, 1, 0, 0)];
    for (i, field) in [MD_REMOTE_IP4, MD_LOCAL_IP4, MD_REMOTE_PORT, MD_LOCAL_PORT]
        .into_iter()
        .enumerate()
    {
        p.push(insn(LDXW, 2, 6, field, 0));
        if field == MD_REMOTE_PORT {
            // Little-endian kernels hand the remote port shifted into the high 16 bits (a
            // long-standing quirk of this context field); normalise to the low 16.
            p.push(insn(JLE_K, 2, 0, 1, 0xffff));
            p.push(insn(RSH_K, 2, 0, 0, 16));
        }
        p.push(insn(STXW, FP, 2, -16 + 4 * i as i16, 0));
    }
    p.extend([
        insn(MOV_X, 1, 6, 0, 0),
        insn(LD_DW, 2, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(MOV_X, 3, FP, 0, 0),
        insn(ADD_K, 3, 0, 0, -16),
        insn(MOV_K, 4, 0, 0, BPF_F_INGRESS),
        insn(CALL, 0, 0, 0, FUNC_MSG_REDIRECT_HASH),
        insn(JNE_K, 0, 0, 1, 0),
        insn(MOV_K, 0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// The key under which a socket is found by its peer's program; IPv4 only (an IPv6 pair
/// keeps TCP: the key would need the 16-byte address fields).
fn key(local: SocketAddr, remote: SocketAddr) -> Option<[u8; KEY_SIZE as usize]> {
    let (IpAddr::V4(l), IpAddr::V4(r)) = (local.ip().to_canonical(), remote.ip().to_canonical())
    else {
        return None;
    };
    let mut k = [0u8; KEY_SIZE as usize];
    k[0..4].copy_from_slice(&l.octets());
    k[4..8].copy_from_slice(&r.octets());
    // The peer reads its remote port as the kernel keeps it (network order in the low 16
    // bits) and its local port in host order.
    k[8..12]
        .copy_from_slice(&(u16::from_ne_bytes(local.port().to_be_bytes()) as u32).to_ne_bytes());
    k[12..16].copy_from_slice(&(remote.port() as u32).to_ne_bytes());
    Some(k)
}

/// A sockhash with the redirect program attached; sockets added to it that are each other's
/// peers talk through it. Closed sockets leave the map by themselves; dropping this detaches
/// the program (sockets still in the map keep working through TCP).
pub struct Redirect {
    map: OwnedFd,
    _prog: OwnedFd,
}

impl Redirect {
    pub fn new() -> Result<Self, Error> {
        let map = sys::bpf_map_create(sys::BPF_MAP_TYPE_SOCKHASH, KEY_SIZE, 4, ENTRIES)
            .map_err(Error::Map)?;
        let prog = sys::bpf_prog_load(sys::BPF_PROG_TYPE_SK_MSG, &program(&map), c"Apache-2.0")
            .map_err(Error::Load)?;
        sys::bpf_prog_attach(&map, &prog, sys::BPF_SK_MSG_VERDICT).map_err(Error::Attach)?;
        Ok(Self { map, _prog: prog })
    }

    /// Adds an established TCP socket whose addresses are `local` and `peer`. Returns false
    /// (nothing added) for an IPv6 pair.
    pub fn add(
        &self,
        socket: &impl AsFd,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<bool, Error> {
        let Some(k) = key(local, peer) else {
            return Ok(false);
        };
        let fd = socket.as_fd().as_raw_fd() as u32;
        sys::bpf_map_update(&self.map, &k, &fd.to_ne_bytes()).map_err(Error::Add)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key a socket is stored under is the one its peer's program builds from its own
    /// context: (its remote ip, its local ip, its remote port as the kernel stores it, its
    /// local port in host order).
    #[test]
    fn a_socket_is_keyed_as_its_peer_looks_it_up() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.1.0.5:40000".parse().unwrap(),
            "10.1.0.9:15008".parse().unwrap(),
        );
        let k = key(a, b).unwrap();
        // The peer (b) sees remote_ip4 = a's ip, local_ip4 = b's ip, remote_port = a's port,
        // local_port = b's port.
        assert_eq!(&k[0..4], &[10, 1, 0, 5]);
        assert_eq!(&k[4..8], &[10, 1, 0, 9]);
        // Network order in the low 16 bits (x86: the first two bytes).
        assert_eq!(&k[8..12], &[0x9c, 0x40, 0, 0]);
        assert_eq!(u32::from_ne_bytes(k[12..16].try_into().unwrap()), 15008);
        let mapped: SocketAddr = "[::ffff:10.1.0.5]:40000".parse().unwrap();
        assert_eq!(key(mapped, b), Some(k), "v4-mapped addresses are IPv4");
        assert_eq!(
            key(
                "[fd00::1]:1".parse().unwrap(),
                "[fd00::2]:2".parse().unwrap()
            ),
            None
        );
    }
}
