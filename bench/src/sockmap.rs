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
//! Both sockets are put in the map from user space here. The agent does so for the HBONE
//! leg (`ambit_common::sockmap`, the same program); the app legs keep TCP on purpose: the
//! kernel does not bound what a redirect queues at a reader that stops reading, and an app has
//! no flow control towards the agent (ARCHITECTURE.md, "The app legs keep TCP, on purpose").

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;

use ambit_common::netns::Netns;
use ambit_common::sockmap::Redirect;

/// Adds both sockets of a pair to `redirect`.
fn add(redirect: &Redirect, s: &TcpStream) -> Result<()> {
    anyhow::ensure!(
        redirect.add(s, s.local_addr()?, s.peer_addr()?)?,
        "the spike's pairs are IPv4"
    );
    Ok(())
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
    ambit_tests::rx_bytes_by_device(ns)
        .into_iter()
        .find_map(|(name, rx)| (name == dev).then_some(rx))
        .unwrap_or(0)
}

/// A connected pair over `leg`, both in `redirect` if given.
fn pair(leg: &Leg, redirect: Option<&Redirect>) -> Result<(TcpStream, TcpStream)> {
    let c = crate::connect(&leg.client, leg.listener.local_addr()?)?;
    let (s, _) = leg.listener.accept()?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    if let Some(r) = redirect {
        add(r, &c)?;
        add(r, &s)?;
    }
    Ok((c, s))
}

fn one_run(leg: &Leg, redirect: Option<&Redirect>, seconds: f64, iterations: usize) -> Result<Run> {
    let pid = std::process::id();
    let (mut c, mut s) = pair(leg, redirect)?;
    let dev0 = rx_bytes(&leg.server, leg.dev);
    let (cpu0, cs0) = (crate::cpu_seconds(pid), crate::ctx_switches(pid));
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || crate::count_to_eof(&mut s, &mut vec![0u8; 64 << 10]));
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

/// What the spike measured on one leg.
pub struct LegRuns {
    pub name: &'static str,
    pub plain: Vec<Run>,
    pub redirected: Vec<Run>,
}

/// What the spike measured.
pub struct Spike {
    pub legs: Vec<LegRuns>,
}

/// `repeat` runs of each mode (plain TCP, redirected), alternated, on each kind of same-host
/// leg, in namespaces of their own: `loopback`, as between an app and the agent's socket in
/// its pod (one namespace); `veth`, as between the agent's HBONE sockets in two pods of the
/// node (two namespaces joined by a veth pair).
pub fn spike(seconds: f64, iterations: usize, repeat: usize) -> Result<Spike> {
    let pod = ambit_tests::NsGuard::new(ambit_tests::unique("ambit-spike"))?;
    let (a, b) = crate::veth_pair(
        "ambit-spike",
        ["spk0", "spk1"],
        ["192.0.2.1/30", "192.0.2.2/30"],
    )?;
    let legs = [
        Leg {
            name: "loopback",
            client: pod.open(),
            server: pod.open(),
            listener: crate::listen_in(&pod.open(), "127.0.0.1:0")?,
            dev: "lo",
        },
        Leg {
            name: "veth",
            client: a.open(),
            server: b.open(),
            listener: crate::listen_in(&b.open(), "192.0.2.2:0")?,
            dev: "spk1",
        },
    ];
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
    Ok(Spike { legs: out })
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
    serde_json::json!({ "legs": legs })
}

/// The spike's table: medians per leg, and redirected ÷ plain.
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
    out
}
