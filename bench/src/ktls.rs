//! Spike (issue 20, item 3): kernel TLS on the HBONE socket, measured.
//!
//! What a sending agent does per byte today: read the app's bytes from its socket (a copy out
//! of the kernel), hand them to rustls (a copy into its record buffer), seal the records, and
//! write them (a copy into the kernel); the receiving agent reads one record per `read` (rustls
//! reads at most one record at a time), opens it, copies the plaintext out, and writes it to its
//! app. With kernel TLS the socket takes plaintext and makes and seals the records itself, and
//! gives plaintext back on `read`, as many records per call as the buffer holds; with `splice`
//! the sender's bytes go from the app's socket to the TLS socket without entering user space.
//!
//! On the machines this project runs on the kernel has no `CONFIG_TLS`; `bench/ktls-guest.sh`
//! runs the spike in a guest booted from a kernel that has it.
//!
//! This measures, on one stream and alternated in the same run, the two relays of a
//! cross-node connection, modelled without HTTP/2 (the framing is the same in every mode):
//! app A → (loopback) → relay A → TLS over a veth pair between two namespaces → relay B →
//! (loopback) → app B. Modes ([`MODES`]): `rustls` (as the agent does it now: blocking
//! sockets, rustls's buffered connection), `ktls` (the rustls handshake, then the keys given to
//! the kernel with `TLS_TX` / `TLS_RX`; relays `read` and `write` plaintext), `ktls-tx` and
//! `ktls-rx` (only relay A's or only relay B's side in the kernel, the other in rustls),
//! `ktls-splice` (as `ktls`, relay A moves the bytes from app A's socket to the TLS socket with
//! `splice` through a pipe). Figures: throughput, and CPU and context switches of the two
//! relay threads (`getrusage` per thread: the apps' own costs are the same in every mode and
//! left out) per GB.
//!
//! The certificates and TLS configurations are the agent's own (`tls::client_config` and
//! `server_config`, the suites it negotiates: AES-256-GCM first).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::sockopt;
use rustls::{ClientConnection, ConnectionTrafficSecrets, ServerConnection};

use ambit_common::netns::Netns;
use ambit_proxy::identity::Identity;

/// The modes, in the order each run measures them: which relay gives its keys to the kernel.
/// `ktls-tx` (relay A's records sealed by the kernel, opened by rustls) and `ktls-rx` (sealed
/// by rustls, opened by the kernel) also prove that the keys handed over are rustls's own: two
/// kernel ends agree with each other even on a wrong key layout, a kernel and rustls do not.
pub const MODES: [&str; 5] = ["rustls", "ktls-tx", "ktls-rx", "ktls", "ktls-splice"];

/// Figures of one run of one mode.
#[derive(Clone, Copy, Default)]
pub struct Run {
    pub gbps: f64,
    /// CPU seconds of the two relay threads per GB relayed.
    pub cpu_per_gb: f64,
    /// Their voluntary and involuntary context switches per GB.
    pub switches_per_gb: f64,
}

/// The kernel's description of one direction's key: TLS 1.3 with the suite rustls negotiated,
/// the first four bytes of rustls's 12-byte IV as the salt and the rest as the IV.
fn crypto_info(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<sockopt::TlsCryptoInfo> {
    let info = |cipher_type| libc::tls_crypto_info {
        version: libc::TLS_1_3_VERSION,
        cipher_type,
    };
    Ok(match secrets {
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let iv = iv.as_ref();
            sockopt::TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: iv[4..].try_into()?,
                key: key.as_ref().try_into()?,
                salt: iv[..4].try_into()?,
                rec_seq: seq.to_be_bytes(),
            })
        }
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let iv = iv.as_ref();
            sockopt::TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: iv[4..].try_into()?,
                key: key.as_ref().try_into()?,
                salt: iv[..4].try_into()?,
                rec_seq: seq.to_be_bytes(),
            })
        }
        _ => anyhow::bail!("a suite the spike does not give the kernel"),
    })
}

/// Hands an established connection's keys to the kernel (both directions).
fn to_kernel(sock: &TcpStream, secrets: rustls::ExtractedSecrets) -> Result<()> {
    crate::sys::tls_ulp(sock).context("TCP_ULP \"tls\"")?;
    let (tx, rx) = (
        crypto_info(secrets.tx.0, secrets.tx.1)?,
        crypto_info(secrets.rx.0, secrets.rx.1)?,
    );
    crate::sys::tls_keys(sock, &tx, &rx).map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))
}

/// The two sides of one TLS connection, with the agent's configurations.
struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl Tls {
    fn new(dir: &std::path::Path) -> Result<Self> {
        let ca = ambit_agent::ca::Ca::load(
            &ambit_agent::ca::Source::Embedded {
                dir: dir.to_owned(),
            },
            "cluster.local",
        )?;
        let a = Identity::new("cluster.local", "default", "spike-a");
        let b = Identity::new("cluster.local", "default", "spike-b");
        let ka = ca.issue(&a, Duration::from_secs(3600))?.key;
        let kb = ca.issue(&b, Duration::from_secs(3600))?.key;
        let mut client = ambit_proxy::tls::client_config(ka, ca.roots(), vec![b])?;
        client.enable_secret_extraction = true;
        let mut server = ambit_proxy::tls::server_config(
            Arc::new(ambit_proxy::tls::ResolveWith(move || Some(kb.clone()))),
            ca.roots(),
            "cluster.local",
        )?;
        server.enable_secret_extraction = true;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Both handshakes over `c` (client) and `s` (server), each on its own thread.
    fn handshake(
        &self,
        c: &mut TcpStream,
        mut s: TcpStream,
    ) -> Result<(ClientConnection, ServerConnection, TcpStream)> {
        let server = self.server.clone();
        let srv = std::thread::spawn(move || -> Result<(ServerConnection, TcpStream)> {
            let mut conn = ServerConnection::new(server)?;
            while conn.is_handshaking() {
                conn.complete_io(&mut s)?;
            }
            Ok((conn, s))
        });
        let name = rustls::pki_types::ServerName::try_from("spike-b")?.to_owned();
        let mut conn = ClientConnection::new(self.client.clone(), name)?;
        while conn.is_handshaking() {
            conn.complete_io(c)?;
        }
        let (sconn, s) = srv
            .join()
            .map_err(|_| anyhow::anyhow!("server handshake panicked"))??;
        Ok((conn, sconn, s))
    }
}

/// A connected pair: `client` in `from`, accepted from `listener`.
fn pair(from: &Netns, listener: &TcpListener) -> Result<(TcpStream, TcpStream)> {
    let c = crate::connect(from, listener.local_addr()?)?;
    let (s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok((c, s))
}

/// Runs `relay` on a thread of its own; the thread's CPU seconds and context switches.
fn spawn_measured(relay: impl FnOnce() -> Result<()> + Send + 'static) -> Relay {
    std::thread::spawn(move || {
        let u0 = crate::sys::thread_usage()?;
        relay()?;
        let u1 = crate::sys::thread_usage()?;
        Ok((u1.0 - u0.0, u1.1 - u0.1))
    })
}

type Relay = std::thread::JoinHandle<Result<(f64, u64)>>;

/// Copies `from` to `to` with reads of up to `buf` bytes until `from` ends, then ends `to`.
fn pump(from: &mut TcpStream, to: &mut TcpStream, buf: usize) -> Result<()> {
    let mut buf = vec![0u8; buf];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
    }
    to.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Relay A in user space: app bytes in, records sealed by rustls out.
fn relay_a_rustls(
    mut app: TcpStream,
    mut tls: TcpStream,
    mut conn: ClientConnection,
) -> Result<()> {
    // A multiple of the 16 KiB record, as the agent's relay reads.
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = app.read(&mut buf)?;
        if n == 0 {
            break;
        }
        conn.writer().write_all(&buf[..n])?;
        while conn.wants_write() {
            conn.write_tls(&mut tls)?;
        }
    }
    // No close_notify: a kernel-TLS reader would see an alert record where it expects data;
    // both readers end at the TCP end of stream.
    tls.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Relay B in user space: records in, opened by rustls, app bytes out.
fn relay_b_rustls(
    mut tls: TcpStream,
    mut app: TcpStream,
    mut conn: ServerConnection,
) -> Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    'outer: loop {
        if conn.read_tls(&mut tls)? == 0 {
            break;
        }
        conn.process_new_packets()
            .context("opening the records relay A sent")?;
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => break 'outer,
                Ok(n) => app.write_all(&buf[..n])?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    app.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Relay A with kernel TLS: app bytes in, plaintext written to the TLS socket (or spliced).
fn relay_a_kernel(mut app: TcpStream, mut tls: TcpStream, splice: bool) -> Result<()> {
    if !splice {
        return pump(&mut app, &mut tls, 64 << 10);
    }
    let (r, w) = crate::sys::pipe()?;
    while crate::sys::splice_through(&app, (&r, &w), &tls, 64 << 10)? > 0 {}
    tls.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Relay B with kernel TLS: plaintext read from the TLS socket (reads as large as the
/// agent's largest relay buffer: the kernel fills them with as many records as are there),
/// written to the app.
fn relay_b_kernel(mut tls: TcpStream, mut app: TcpStream) -> Result<()> {
    pump(&mut tls, &mut app, 128 << 10)
}

/// The namespaces and listeners of one spike: app A and relay A in `a`, relay B and app B in
/// `b`, a veth pair between them.
struct Rig {
    a: Netns,
    b: Netns,
    app_a: TcpListener,
    wire: TcpListener,
    app_b: TcpListener,
}

fn one_run(rig: &Rig, tls: &Tls, mode: &str, seconds: f64) -> Result<Run> {
    let (app_a, relay_a_app) = pair(&rig.a, &rig.app_a)?;
    let (mut relay_a_tls, relay_b_tls) = pair(&rig.a, &rig.wire)?;
    let (relay_b_app, app_b) = pair(&rig.b, &rig.app_b)?;
    let (cconn, sconn, relay_b_tls) = tls.handshake(&mut relay_a_tls, relay_b_tls)?;
    let (kernel_a, kernel_b) = match mode {
        "rustls" => (false, false),
        "ktls-tx" => (true, false),
        "ktls-rx" => (false, true),
        _ => (true, true),
    };
    let splice = mode == "ktls-splice";
    // The spike has no session tickets (the agent's server sends none) or key updates to
    // handle, so the older extraction is enough here.
    #[allow(deprecated)]
    let ra: Relay = if kernel_a {
        to_kernel(&relay_a_tls, cconn.dangerous_extract_secrets()?)?;
        spawn_measured(move || relay_a_kernel(relay_a_app, relay_a_tls, splice))
    } else {
        spawn_measured(move || relay_a_rustls(relay_a_app, relay_a_tls, cconn))
    };
    #[allow(deprecated)]
    let rb: Relay = if kernel_b {
        to_kernel(&relay_b_tls, sconn.dangerous_extract_secrets()?)?;
        spawn_measured(move || relay_b_kernel(relay_b_tls, relay_b_app))
    } else {
        spawn_measured(move || relay_b_rustls(relay_b_tls, relay_b_app, sconn))
    };
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut app_b = app_b;
        crate::count_to_eof(&mut app_b, &mut vec![0u8; 64 << 10])
    });
    let mut app_a = app_a;
    let chunk = vec![7u8; 64 << 10];
    let until = t0 + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    // A write error here is a relay's failure seen from outside: the relays say why.
    let mut wrote = Ok(());
    while Instant::now() < until {
        if let Err(e) = app_a.write_all(&chunk) {
            wrote = Err(e);
            break;
        }
        sent += chunk.len() as u64;
    }
    let _ = app_a.shutdown(std::net::Shutdown::Write);
    let join = |h: Relay| -> Result<(f64, u64)> {
        h.join().map_err(|_| anyhow::anyhow!("a relay panicked"))?
    };
    // Both joined before either error is returned: when one relay fails the other usually
    // fails after it (a reset), and the first cause is the one worth reading.
    let (ua, ub) = match (join(ra), join(rb)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => anyhow::bail!(
            "{mode}: relay A: {}; relay B: {}",
            a.map_or_else(|e| format!("{e:#}"), |_| "ok".into()),
            b.map_or_else(|e| format!("{e:#}"), |_| "ok".into())
        ),
    };
    wrote.context("app A's writes")?;
    let bytes = reader
        .join()
        .map_err(|_| anyhow::anyhow!("app B panicked"))?;
    anyhow::ensure!(
        bytes == sent,
        "{mode}: app B received {bytes} of the {sent} bytes app A sent"
    );
    let wall = t0.elapsed().as_secs_f64();
    let gb = bytes as f64 / 1e9;
    Ok(Run {
        gbps: gb * 8.0 / wall,
        cpu_per_gb: (ua.0 + ub.0) / gb.max(1e-9),
        switches_per_gb: (ua.1 + ub.1) as f64 / gb.max(1e-9),
    })
}

/// What the spike measured: every run of each mode, or why kernel TLS could not be measured.
pub enum Spike {
    Measured(Vec<(&'static str, Vec<Run>)>),
    Unavailable(String),
}

/// `repeat` runs of each mode, alternated, of `seconds` each.
pub fn spike(seconds: f64, repeat: usize) -> Result<Spike> {
    let (a, b) = crate::veth_pair(
        "ambit-ktls",
        ["ktl0", "ktl1"],
        ["192.0.2.5/30", "192.0.2.6/30"],
    )?;
    let rig = Rig {
        app_a: crate::listen_in(&a.open(), "127.0.0.1:0")?,
        wire: crate::listen_in(&b.open(), "192.0.2.6:0")?,
        app_b: crate::listen_in(&b.open(), "127.0.0.1:0")?,
        a: a.open(),
        b: b.open(),
    };
    let dir = std::env::temp_dir().join(format!("ambit-ktls-spike-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tls = Tls::new(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let tls = tls?;
    {
        let (mut c, s) = pair(&rig.a, &rig.wire)?;
        let (_, _, _s) = tls.handshake(&mut c, s)?;
        if let Err(e) = crate::sys::tls_ulp(&c) {
            return Ok(Spike::Unavailable(format!(
                "kernel TLS: unavailable here, TCP_ULP \"tls\" refused with {e} (tcp_available_ulp: {})",
                std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
                    .unwrap_or_default()
                    .trim()
            )));
        }
    }
    let mut out: Vec<(&'static str, Vec<Run>)> = MODES.iter().map(|m| (*m, Vec::new())).collect();
    for i in 0..repeat {
        eprintln!("  run {}/{repeat}", i + 1);
        for (mode, runs) in &mut out {
            runs.push(one_run(&rig, &tls, mode, seconds)?);
        }
    }
    Ok(Spike::Measured(out))
}

/// Every run, as JSON.
pub fn json(spike: &Spike) -> serde_json::Value {
    match spike {
        Spike::Unavailable(why) => serde_json::json!({ "unavailable": why }),
        Spike::Measured(modes) => {
            let m: serde_json::Map<String, serde_json::Value> = modes
                .iter()
                .map(|(mode, runs)| {
                    let v: Vec<serde_json::Value> = runs
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "gbps": r.gbps,
                                "relay_cpu_s_per_gb": r.cpu_per_gb,
                                "relay_switches_per_gb": r.switches_per_gb,
                            })
                        })
                        .collect();
                    (mode.to_string(), serde_json::Value::Array(v))
                })
                .collect();
            serde_json::json!({ "modes": m, "kernel": kernel_release() })
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The spike's table: medians per mode, and each mode ÷ `rustls`.
pub fn table(spike: &Spike) -> String {
    let modes = match spike {
        Spike::Unavailable(why) => return format!("{why}\n"),
        Spike::Measured(m) => m,
    };
    type Row = (&'static str, fn(&Run) -> f64);
    let rows: [Row; 3] = [
        ("1 stream Gbit/s", |r| r.gbps),
        ("relays' CPU s per GB", |r| r.cpu_per_gb),
        ("relays' context switches per GB", |r| r.switches_per_gb),
    ];
    let mut out = format!(
        "Kernel TLS spike, one stream across a veth pair (kernel {}), medians of {} runs\n\n\
         | figure | {} |\n|---|{}\n",
        kernel_release(),
        modes[0].1.len(),
        modes
            .iter()
            .map(|(m, _)| if *m == "rustls" {
                m.to_string()
            } else {
                format!("{m} (÷ rustls)")
            })
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(modes.len()),
    );
    for (name, f) in rows {
        let med: Vec<f64> = modes
            .iter()
            .map(|(_, runs)| crate::median(runs.iter().map(f).collect()))
            .collect();
        out.push_str(&format!("| {name} | {:.3} |", med[0]));
        for m in &med[1..] {
            out.push_str(&format!(" {m:.3} ({:.2}x) |", m / med[0].max(1e-12)));
        }
        out.push('\n');
    }
    out
}
