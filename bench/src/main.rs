//! ambit-bench: the same-node data-path benchmark.
//!
//! Two pods on one node (bridge + host-local + ambit-cni through libcni, ambit-agent running).
//! First through Ambit (client pod → 15001 → HBONE → server pod's 15008 → app), then the
//! same pods with their capture rules removed (direct), in the same run, and reports each
//! figure with its ratio to direct. A measurement, not a test: nothing here asserts a speed.
//!
//!     bash bench/run.sh                    # installs what it needs, builds release, runs
//!     bash bench/run.sh --seconds 5 --json out.json

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_common::netns::Netns;
use ambit_tests::{Node, require_root};
use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Same-node throughput and latency through Ambit vs direct")]
struct Args {
    /// Seconds of the single-stream throughput test.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Round trips per latency test (after 1,000 warm-up round trips).
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// New connections in the connection-setup test.
    #[arg(long, default_value_t = 2_000)]
    connections: usize,
    /// Extra ambit-agent arguments, e.g. `--agent-arg=--worker-threads=1` (repeatable): to
    /// measure a lever against the default in the same conditions.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const SINK_PORT: u16 = 5201;
const ECHO_PORT: u16 = 5202;
const WARMUP: usize = 1_000;

/// Figures of one mode (direct or through Ambit).
#[derive(Default, Debug)]
struct Figures {
    gbps: f64,
    rtt1: (f64, f64),
    rtt1k: (f64, f64),
    connect: (f64, f64),
    agent_cores: f64,
}

fn bind(ns: &Netns, port: u16) -> Result<TcpListener> {
    ns.run(|| TcpListener::bind(("0.0.0.0", port)))
        .map_err(anyhow::Error::msg)?
        .with_context(|| format!("binding :{port}"))
}

fn connect(ns: &Netns, dst: SocketAddr) -> Result<TcpStream> {
    let s = ns
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .map_err(anyhow::Error::msg)??;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Serves `conns` connections: counts bytes to EOF and answers the count (8 bytes, BE).
fn sink(l: TcpListener, conns: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        for _ in 0..conns {
            let Ok((mut c, _)) = l.accept() else { return };
            let mut n = 0u64;
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = c.write_all(&n.to_be_bytes());
        }
    })
}

/// Serves `conns` connections, echoing everything until EOF, one thread per connection.
fn echo(l: TcpListener, conns: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..conns {
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 || c.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    })
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (pct(&v, 0.5), pct(&v, 0.99))
}

fn throughput(ns: &Netns, dst: SocketAddr, seconds: f64) -> Result<f64> {
    let mut s = connect(ns, dst)?;
    let buf = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    while start.elapsed() < limit {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let secs = start.elapsed().as_secs_f64();
    Ok(u64::from_be_bytes(n) as f64 * 8.0 / secs / 1e9)
}

/// Round trips of `size`-byte messages on one connection, in microseconds.
fn ping_pong(ns: &Netns, dst: SocketAddr, size: usize, n: usize) -> Result<(f64, f64)> {
    let mut s = connect(ns, dst)?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut v = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= WARMUP {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(p50_p99(v))
}

/// New connection + 1-byte echo + close, in microseconds.
fn connections(ns: &Netns, dst: SocketAddr, n: usize) -> Result<(f64, f64)> {
    let mut v = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        let mut s = connect(ns, dst)?;
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        drop(s);
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(p50_p99(v))
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

fn measure(
    args: &Args,
    client: &Netns,
    server: &Netns,
    ip: std::net::IpAddr,
    agent: Option<u32>,
) -> Result<Figures> {
    let sink_srv = sink(bind(server, SINK_PORT)?, 1);
    let echo_srv = echo(bind(server, ECHO_PORT)?, 2 + args.connections);
    let (sink_dst, echo_dst) = (
        SocketAddr::new(ip, SINK_PORT),
        SocketAddr::new(ip, ECHO_PORT),
    );
    let cpu0 = agent.map(cpu_seconds);
    let t0 = Instant::now();
    let gbps = throughput(client, sink_dst, args.seconds)?;
    let wall = t0.elapsed().as_secs_f64();
    let agent_cores = match (agent, cpu0) {
        (Some(pid), Some(c0)) => (cpu_seconds(pid) - c0) / wall,
        _ => 0.0,
    };
    let rtt1 = ping_pong(client, echo_dst, 1, args.iterations)?;
    let rtt1k = ping_pong(client, echo_dst, 1024, args.iterations)?;
    let connect = connections(client, echo_dst, args.connections)?;
    sink_srv.join().ok();
    echo_srv.join().ok();
    Ok(Figures {
        gbps,
        rtt1,
        rtt1k,
        connect,
        agent_cores,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root();
    if std::env::var("AMBIT_PROFILE").as_deref() != Ok("release") {
        eprintln!(
            "note: AMBIT_PROFILE is not 'release': the agent is a debug build (bench/run.sh sets it)"
        );
    }
    let mut node = Node::new("1.0.0")?;
    node.agent_args = args.agent_args.clone();
    node.start_agent()?;
    let a = node.add_pod("bench-client")?;
    let b = node.add_pod("bench-server")?;
    let (ca, cb) = (a.ns.open(), b.ns.open());
    eprintln!("pods: client {} -> server {}", a.ip, b.ip);

    eprintln!("through Ambit (HBONE, same node)...");
    let ambit = measure(&args, &ca, &cb, b.ip, node.agent_pid())?;
    let rss = node.agent_rss_kib().unwrap_or(0);
    let log = node.agent_log();
    anyhow::ensure!(
        log.contains("protocol=\"hbone\""),
        "the measured traffic did not go through HBONE"
    );

    // The same pods without capture: the agent stopped (it would reinstall the rules) and
    // Ambit's table removed from both namespaces.
    node.kill_agent();
    for p in [&a, &b] {
        p.ns.exec(&["nft", "delete", "table", "inet", "ambit"])?;
    }
    eprintln!("direct (capture rules removed)...");
    let direct = measure(&args, &ca, &cb, b.ip, None)?;

    let row = |name: &str, d: f64, x: f64, unit: &str| {
        println!("| {name} | {d:.2} {unit} | {x:.2} {unit} | {:.2}x |", x / d);
    };
    println!("\n| figure | direct | through Ambit | ratio |");
    println!("|---|---|---|---|");
    row("throughput, 1 stream", direct.gbps, ambit.gbps, "Gbit/s");
    row("RTT 1 B p50", direct.rtt1.0, ambit.rtt1.0, "µs");
    row("RTT 1 B p99", direct.rtt1.1, ambit.rtt1.1, "µs");
    row("RTT 1 KiB p50", direct.rtt1k.0, ambit.rtt1k.0, "µs");
    row("RTT 1 KiB p99", direct.rtt1k.1, ambit.rtt1k.1, "µs");
    row(
        "new conn + 1 B echo p50",
        direct.connect.0,
        ambit.connect.0,
        "µs",
    );
    row(
        "new conn + 1 B echo p99",
        direct.connect.1,
        ambit.connect.1,
        "µs",
    );
    println!(
        "\nagent CPU during the throughput test: {:.2} cores ({:.3} core per Gbit/s); agent RSS after: {:.1} MB",
        ambit.agent_cores,
        ambit.agent_cores / ambit.gbps.max(1e-9),
        rss as f64 / 1024.0
    );
    if let Some(path) = &args.json {
        let fig = |f: &Figures| {
            serde_json::json!({
                "throughput_gbps": f.gbps,
                "rtt_1b_us": {"p50": f.rtt1.0, "p99": f.rtt1.1},
                "rtt_1k_us": {"p50": f.rtt1k.0, "p99": f.rtt1k.1},
                "connect_echo_us": {"p50": f.connect.0, "p99": f.connect.1},
            })
        };
        let out = serde_json::json!({
            "direct": fig(&direct),
            "ambit": fig(&ambit),
            "throughput_ratio": ambit.gbps / direct.gbps,
            "agent_cores_during_throughput": ambit.agent_cores,
            "agent_rss_kib": rss,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}
