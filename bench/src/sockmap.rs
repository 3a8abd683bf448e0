//! Spike (issue 20, item 3): sk_msg redirection on the same-host legs, measured.
//!
//! The same-host legs of a proxied connection are TCP through the kernel's stack: every byte
//! is segmented, checksummed, passed through netfilter and a device, and acknowledged. Two
//! kinds: app ↔ the agent's socket inside one pod (loopback; 15001 outbound, the connection to
//! the app inbound), and, between two pods of one node, the agent's HBONE socket in one pod ↔
//! its accepted socket in the other (veth and bridge; the bytes are TLS records). With both
//! sockets of such a pair in a sockhash and an `sk_msg` verdict program on it, a `sendmsg` on
//! one lands directly in the other's receive queue (`bpf_msg_redirect_hash` with
//! `BPF_F_INGRESS`). This measures what that saves on one pair of each kind, with and without,
//! alternated in the same run: throughput of one stream, CPU per GB, context switches per GB,
//! the 1-byte round trip — and the bytes the leg's device received, which prove the redirect
//! took the traffic (a mis-built key silently falls back to TCP and measures nothing).
//!
//! Both sockets are put in the map from user space here. For the HBONE leg the agent owns
//! both; an app's socket is not the agent's to hand over, and would need a `sock_ops` program
//! on the pods' cgroups to enrol it — see ARCHITECTURE.md for what each would take.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::sys::{self, Insn};
use ambit_common::netns::Netns;

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

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
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
fn program(map: &OwnedFd) -> Vec<Insn> {
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

/// The key under which a socket is found by its peer's program (IPv4 only: the spike's pair).
fn key(local: SocketAddr, remote: SocketAddr) -> Result<[u8; KEY_SIZE as usize]> {
    let (IpAddr::V4(l), IpAddr::V4(r)) = (local.ip(), remote.ip()) else {
        anyhow::bail!("the spike's key is IPv4 only");
    };
    let mut k = [0u8; KEY_SIZE as usize];
    k[0..4].copy_from_slice(&l.octets());
    k[4..8].copy_from_slice(&r.octets());
    // The peer reads its remote port as the kernel keeps it (network order in the low 16
    // bits) and its local port in host order.
    k[8..12]
        .copy_from_slice(&(u16::from_ne_bytes(local.port().to_be_bytes()) as u32).to_ne_bytes());
    k[12..16].copy_from_slice(&(remote.port() as u32).to_ne_bytes());
    Ok(k)
}

/// A sockhash with the redirect program attached; sockets added to it talk to each other
/// through it. Dropping it detaches everything.
pub struct Redirect {
    map: OwnedFd,
    _prog: OwnedFd,
}

impl Redirect {
    pub fn new() -> Result<Self> {
        let map = sys::map_create(sys::MAP_TYPE_SOCKHASH, KEY_SIZE, 4, 64)
            .context("creating a sockhash (needs CONFIG_BPF_STREAM_PARSER)")?;
        let prog = sys::prog_load(sys::PROG_TYPE_SK_MSG, &program(&map), c"Apache-2.0")
            .context("loading the sk_msg program")?;
        sys::prog_attach(&map, &prog, sys::ATTACH_SK_MSG_VERDICT)
            .context("attaching the sk_msg program")?;
        Ok(Self { map, _prog: prog })
    }

    pub fn add(&self, s: &TcpStream) -> Result<()> {
        let k = key(s.local_addr()?, s.peer_addr()?)?;
        sys::map_update(&self.map, &k, &(s.as_raw_fd() as u32).to_ne_bytes())
            .context("adding a socket to the sockhash")
    }
}

/// Figures of one run of one mode.
#[derive(Clone, Copy, Default)]
pub struct Run {
    pub gbps: f64,
    pub cpu_per_gb: f64,
    pub switches_per_gb: f64,
    pub rtt_p50_us: f64,
    /// Bytes the leg's device received per byte relayed (≈1 through TCP, ≈0 redirected).
    pub dev_per_byte: f64,
}

/// One kind of same-host leg: a client socket in `client`, a listener in `server`, and the
/// device the leg's TCP traffic crosses (counted in `server`).
struct Leg {
    name: &'static str,
    client: Netns,
    server: Netns,
    listener: TcpListener,
    dev: &'static str,
}

/// Bytes `dev` in `ns` has received so far.
fn rx_bytes(ns: &Netns, dev: &str) -> u64 {
    ns.run(|| {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let (name, rest) = l.trim().split_once(':')?;
                (name == dev).then(|| rest.split_whitespace().next()?.parse::<u64>().ok())?
            })
            .unwrap_or(0)
    })
    .unwrap_or(0)
}

/// A connected pair over `leg`, both in `redirect` if given.
fn pair(leg: &Leg, redirect: Option<&Redirect>) -> Result<(TcpStream, TcpStream)> {
    let dst = leg.listener.local_addr()?;
    let c = leg
        .client
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .map_err(anyhow::Error::msg)??;
    let (s, _) = leg.listener.accept()?;
    for x in [&c, &s] {
        x.set_nodelay(true)?;
        x.set_read_timeout(Some(Duration::from_secs(10)))?;
    }
    if let Some(r) = redirect {
        r.add(&c)?;
        r.add(&s)?;
    }
    Ok((c, s))
}

fn one_run(leg: &Leg, redirect: Option<&Redirect>, seconds: f64, iterations: usize) -> Result<Run> {
    let pid = std::process::id();
    let (mut c, mut s) = pair(leg, redirect)?;
    let dev0 = rx_bytes(&leg.server, leg.dev);
    let (cpu0, cs0) = (crate::cpu_seconds(pid), crate::ctx_switches(pid));
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0u64;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let chunk = vec![7u8; 64 << 10];
    let until = t0 + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        c.write_all(&chunk)?;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let bytes = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    let wall = t0.elapsed().as_secs_f64();
    let gb = bytes as f64 / 1e9;
    let cpu = crate::cpu_seconds(pid) - cpu0;
    let switches = crate::ctx_switches(pid).saturating_sub(cs0) as f64;
    let dev = rx_bytes(&leg.server, leg.dev).saturating_sub(dev0) as f64;

    let (mut c, mut s) = pair(leg, redirect)?;
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
    });
    let mut v = Vec::with_capacity(iterations);
    let mut b = [0u8; 1];
    for i in 0..iterations + iterations / 10 {
        let t = Instant::now();
        c.write_all(b"x")?;
        c.read_exact(&mut b)?;
        if i >= iterations / 10 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(c);
    echo.join().ok();
    Ok(Run {
        gbps: gb * 8.0 / wall,
        cpu_per_gb: cpu / gb.max(1e-9),
        switches_per_gb: switches / gb.max(1e-9),
        rtt_p50_us: crate::median(v),
        dev_per_byte: dev / (bytes as f64).max(1.0),
    })
}

/// Whether this kernel can put kernel TLS on a socket (the other kernel-side lever of the
/// spike): `setsockopt(TCP_ULP, "tls")` on an established socket.
fn ktls(leg: &Leg) -> Result<String> {
    let (c, _s) = pair(leg, None)?;
    Ok(
        match nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::TcpUlp::default(), b"tls")
        {
            Ok(()) => "kernel TLS: available (TCP_ULP \"tls\" accepted)".to_string(),
            Err(e) => format!(
                "kernel TLS: unavailable here, TCP_ULP \"tls\" refused with {e} (tcp_available_ulp: {})",
                std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
                    .unwrap_or_default()
                    .trim()
            ),
        },
    )
}

/// What the spike measured on one leg.
pub struct LegRuns {
    pub name: &'static str,
    pub plain: Vec<Run>,
    pub redirected: Vec<Run>,
}

/// What the spike measured.
pub struct Spike {
    pub legs: Vec<LegRuns>,
    pub ktls: String,
}

/// `repeat` runs of each mode (plain TCP, redirected), alternated, on each kind of same-host
/// leg, in namespaces of their own: `loopback`, as between an app and the agent's socket in
/// its pod (one namespace); `veth`, as between the agent's HBONE sockets in two pods of the
/// node (two namespaces joined by a veth pair). And whether kernel TLS is there to measure.
pub fn spike(seconds: f64, iterations: usize, repeat: usize) -> Result<Spike> {
    let pod = ambit_tests::NsGuard::new(ambit_tests::unique("ambit-spike"))?;
    let (a, b) = (
        ambit_tests::NsGuard::new(ambit_tests::unique("ambit-spike-a"))?,
        ambit_tests::NsGuard::new(ambit_tests::unique("ambit-spike-b"))?,
    );
    // Created in its namespaces directly: the names never exist in the host's.
    ambit_tests::run_ok(std::process::Command::new("ip").args([
        "link", "add", "spk0", "netns", &a.name, "type", "veth", "peer", "name", "spk1", "netns",
        &b.name,
    ]))?;
    for (ns, dev, addr) in [(&a, "spk0", "192.0.2.1/30"), (&b, "spk1", "192.0.2.2/30")] {
        ns.exec(&["ip", "addr", "add", addr, "dev", dev])?;
        ns.exec(&["ip", "link", "set", dev, "up"])?;
    }
    let listen = |ns: &Netns, addr: &str| -> Result<TcpListener> {
        let addr: SocketAddr = addr.parse()?;
        ns.run(|| TcpListener::bind(addr))
            .map_err(anyhow::Error::msg)?
            .context("binding the spike's listener")
    };
    let legs = [
        Leg {
            name: "loopback",
            client: pod.open(),
            server: pod.open(),
            listener: listen(&pod.open(), "127.0.0.1:0")?,
            dev: "lo",
        },
        Leg {
            name: "veth",
            client: a.open(),
            server: b.open(),
            listener: listen(&b.open(), "192.0.2.2:0")?,
            dev: "spk1",
        },
    ];
    let ktls = ktls(&legs[0])?;
    let redirect = Redirect::new()?;
    let mut out: Vec<LegRuns> = legs
        .iter()
        .map(|l| LegRuns {
            name: l.name,
            plain: Vec::new(),
            redirected: Vec::new(),
        })
        .collect();
    for i in 0..repeat {
        eprintln!("  run {}/{repeat}", i + 1);
        for (leg, runs) in legs.iter().zip(&mut out) {
            runs.plain.push(one_run(leg, None, seconds, iterations)?);
            runs.redirected
                .push(one_run(leg, Some(&redirect), seconds, iterations)?);
        }
    }
    Ok(Spike { legs: out, ktls })
}

/// Every run, as JSON.
pub fn json(spike: &Spike) -> serde_json::Value {
    let runs = |v: &[Run]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|r| {
                serde_json::json!({
                    "gbps": r.gbps,
                    "cpu_s_per_gb": r.cpu_per_gb,
                    "switches_per_gb": r.switches_per_gb,
                    "rtt_p50_us": r.rtt_p50_us,
                    "device_bytes_per_byte": r.dev_per_byte,
                })
            })
            .collect()
    };
    let legs: serde_json::Map<String, serde_json::Value> = spike
        .legs
        .iter()
        .map(|l| {
            let v = serde_json::json!({
                "tcp": runs(&l.plain),
                "sk_msg_redirect": runs(&l.redirected),
            });
            (l.name.to_string(), v)
        })
        .collect();
    serde_json::json!({ "legs": legs, "ktls": spike.ktls })
}

/// The spike's table: medians per leg, and redirected ÷ plain; then the kernel TLS probe.
pub fn table(spike: &Spike) -> String {
    type Row = (&'static str, fn(&Run) -> f64);
    let rows: [Row; 5] = [
        ("1 stream Gbit/s", |r| r.gbps),
        ("CPU s per GB (both ends)", |r| r.cpu_per_gb),
        ("context switches per GB", |r| r.switches_per_gb),
        ("1 B round trip p50 µs", |r| r.rtt_p50_us),
        ("device bytes per byte sent", |r| r.dev_per_byte),
    ];
    let mut out = String::from(
        "| one same-host pair, medians | TCP | sk_msg redirect | redirect ÷ TCP |\n|---|---|---|---|\n",
    );
    for leg in &spike.legs {
        for (name, f) in rows {
            let a = crate::median(leg.plain.iter().map(f).collect());
            let b = crate::median(leg.redirected.iter().map(f).collect());
            out.push_str(&format!(
                "| {}: {name} | {a:.3} | {b:.3} | {:.2}× |\n",
                leg.name,
                b / a.max(1e-12)
            ));
        }
    }
    out.push('\n');
    out.push_str(&spike.ktls);
    out.push('\n');
    out
}
