//! ambit-bench: the benchmark suite.
//!
//! Two pods on one node (bridge + host-local + ambit-cni through libcni, ambit-agent running).
//! Every figure is measured through Ambit (client pod → 15001 → HBONE → server pod's 15008 →
//! app) and then between the same pods with their capture rules removed (direct), in the same
//! run, unpinned and with every process pinned to one vCPU, `--repeat` times each; the report
//! gives medians and ratios to direct, as a Markdown table and JSON. Also: CNI ADD latency of
//! the whole chain through libcni, the agent's RSS with 0, 100 and 250 captured pods and
//! during the throughput test, and Services at scale ([`services`]: load time, VIP lookup
//! cost, RSS growth with `--services`, and the data path by VIP next to by pod IP). With
//! `--baseline-agent PATH` (an agent built from another commit), the same figures are measured
//! through that agent too, on the same pods in the same run, and reported side by side. The
//! data-path figures are measured across two nodes as well ([`cross`]: each agent one half of
//! every connection). A measurement, not a test: nothing here asserts a speed.
//!
//!     bash bench/run.sh                              # installs what it needs, builds release
//!     bash bench/run.sh --json out.json --markdown out.md
//!     bash bench/run.sh --smoke                      # seconds; what CI runs

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

mod cross;
mod ktls;
mod pods;
mod services;
mod sockmap;
mod sys;

use ambit_common::netns::Netns;
use ambit_tests::{Node, require_root};
use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

#[derive(Parser, Clone)]
#[command(about = "Ambit's benchmark suite: through Ambit vs direct, in the same run")]
struct Args {
    /// Seconds of each single-stream throughput run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Round trips per latency run (after 1,000 warm-up round trips).
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// New connections per connection-setup run.
    #[arg(long, default_value_t = 2_000)]
    connections: usize,
    /// Parallel streams of the multi-stream throughput figure.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Concurrent connections of the many-connection throughput figure.
    #[arg(long, default_value_t = 1_000)]
    many: usize,
    /// Runs of every figure, per mode and variant; the report gives medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Skip the variant with every process pinned to one vCPU.
    #[arg(long)]
    no_pinned: bool,
    /// Pods whose CNI ADD latency is measured.
    #[arg(long, default_value_t = 50)]
    add_pods: usize,
    /// Captured-pod counts at which the agent's RSS is read (pods added in between).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 100, 250])]
    rss_pods: Vec<usize>,
    /// Services of the Services-at-scale figures.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints of each of those Services.
    #[arg(long, default_value_t = 5)]
    endpoints_per_service: usize,
    /// Remote pods of the pods-at-scale figures on the agent (manifests), one run per size.
    #[arg(long, value_delimiter = ',', default_values_t = vec![20_000, 100_000])]
    scale_pods: Vec<usize>,
    /// Pods of the churn figure (in process, through the Kubernetes source).
    #[arg(long, default_value_t = 100_000)]
    churn_pods: usize,
    /// Pod events a second of the churn figure.
    #[arg(long, default_value_t = 500)]
    churn_rate: usize,
    /// Seconds of churn.
    #[arg(long, default_value_t = 60.0)]
    churn_seconds: f64,
    /// Only the in-process figures (the Services store figures and the pod churn: no node,
    /// no agent), printed as their Markdown rows.
    #[arg(long)]
    store_only: bool,
    /// The data-path topologies to measure (comma-separated): `same-node` (one agent does
    /// both halves of every connection; the node's other figures come with it: CNI ADD, RSS
    /// by pods, Services and pods at scale) and `cross-node` (client and server pod on two
    /// nodes joined by a veth wire, each agent one half: most production traffic).
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Topology::SameNode, Topology::CrossNode])]
    topology: Vec<Topology>,
    /// Only the sockmap spike (issue 20): one same-host TCP pair with and without sk_msg
    /// redirection, `--repeat` alternated runs of `--seconds` and `--iterations`; no node.
    #[arg(long)]
    sockmap_spike: bool,
    /// Only the kernel TLS spike (issue 20): one stream relayed through TLS across a veth pair
    /// with rustls, with kernel TLS, and with kernel TLS and `splice`, `--repeat` alternated
    /// runs of `--seconds`; no node. Needs a kernel with `CONFIG_TLS` (`bench/ktls-guest.sh`
    /// boots one).
    #[arg(long)]
    ktls_spike: bool,
    /// A short run that only checks the suite works (CI): tiny durations, one repetition.
    #[arg(long)]
    smoke: bool,
    /// Extra ambit-agent arguments, e.g. `--agent-arg=--worker-threads=1` (repeatable): to
    /// measure a lever against the default in the same conditions.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// An ambit-agent binary to compare with (built from the commit before a change): the
    /// data-path figures are measured through it too, after this build's, on the same pods,
    /// and reported as this build ÷ baseline.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// Extra arguments for the baseline agent alone (repeatable, after any `--agent-arg`,
    /// which both get), e.g. `--baseline-agent target/release/ambit-agent
    /// --baseline-agent-arg=--worker-spin-us=0`: a lever that is a flag, measured against the
    /// same binary without it.
    #[arg(
        long = "baseline-agent-arg",
        allow_hyphen_values = true,
        requires = "baseline_agent"
    )]
    baseline_agent_args: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown table here (it is printed either way).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// Where the client and the server pod of the data-path figures run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    SameNode,
    CrossNode,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.smoke {
            self.seconds = 0.3;
            self.iterations = 200;
            self.connections = 20;
            self.many = 20;
            self.repeat = 1;
            self.add_pods = 3;
            self.rss_pods = vec![0, 3];
            self.services = 100;
            self.scale_pods = vec![200, 1_000];
            self.churn_pods = 1_000;
            self.churn_rate = 200;
            self.churn_seconds = 1.0;
        }
        self
    }
}

const SINK_PORT: u16 = 5201;
/// The echo port of the Services figures (the bench Service's port).
const ECHO_PORT: u16 = 5202;
/// The data-path runs' echo ports: `RUN_ECHO_PORTS` ports from here, one per run in turn
/// ([`run_echo_port`]).
const RUN_ECHO_PORT_FIRST: u16 = 5300;
const RUN_ECHO_PORTS: u16 = 1_000;
const MANY_SINK_PORT: u16 = 5203;
/// The VIP of the bench server's own Service (outside the scale set's 10.96.0.0/16).
const BENCH_VIP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 97, 0, 1));
/// How long the parallel-throughput figures may take to deliver what was written.
const STALL_LIMIT: Duration = Duration::from_secs(180);
const WARMUP: usize = 1_000;
/// Round trips a second of the light-load figure: a rate at which the agent's cost per
/// request shows, and whatever it spends while it waits (polling before a worker sleeps)
/// is not hidden behind a saturated CPU.
const PACED_PER_SECOND: u32 = 1_000;

/// Figures of one run.
#[derive(Default, Debug, Clone)]
struct Figures {
    gbps: f64,
    /// Throughput with `--streams` parallel connections.
    gbps_streams: f64,
    /// Throughput with `--many` concurrent connections.
    gbps_many: f64,
    rtt1: (f64, f64),
    rtt1k: (f64, f64),
    connect: (f64, f64),
    agent_cores: f64,
    /// The agents' context switches (all threads, voluntary + involuntary) per GB relayed
    /// during the single-stream figure.
    ctx_per_gb: f64,
    /// Agent RSS peak during the single-stream figure.
    rss_peak_kib: u64,
    /// Agent RSS when the single-stream figure started: what earlier figures left.
    rss_before_kib: u64,
    /// Agent RSS peak during the `--many` figure.
    rss_many_peak_kib: u64,
    /// The agent's CPU (cores) while 1-byte round trips go at `PACED_PER_SECOND`.
    paced_cores: f64,
    /// The agents' CPU per connection of the new-connection figure, in µs (per-thread
    /// `schedstat`, polling included): with everything on one vCPU the new-connection
    /// latency is mostly CPU, and this reads it as CPU.
    connect_cpu_us: f64,
    /// How many agent processes the agent figures summed (0: the direct run).
    agents: usize,
}

/// The agent's settings as production runs it, before the bench's own: the test harness asks
/// for debug logs and a fast reconcile loop, and a debug line per HTTP/2 frame would be
/// measured as data-path cost.
const PRODUCTION_ARGS: [&str; 4] = ["--log", "info", "--reconcile-seconds", "5"];

/// The agent hands freed memory back on its reconcile pass (every 5 s as the bench runs it):
/// waiting this long after a figure lets its RSS return before the next one is measured.
const SETTLE: Duration = Duration::from_secs(6);

/// Samples the summed RSS of some processes (the agents) every 50 ms until stopped; keeps
/// the peak.
struct RssPeak {
    /// RSS when sampling started.
    before: u64,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssPeak {
    fn start(pids: &[u32]) -> Self {
        let pids = pids.to_vec();
        let sum = move || pids.iter().map(|&p| rss_kib(p)).sum::<u64>();
        let before = sum();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(sum());
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        Self {
            before,
            stop,
            thread,
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Prints the last lines of an agent's log (the node directory, and the log with it, goes
/// with the node when a figure fails).
fn print_log_tail(name: &str, log: &str) {
    let tail: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("  "))
        .rev()
        .take(30)
        .collect();
    eprintln!("{name} log (last lines):");
    for l in tail.into_iter().rev() {
        eprintln!("  {l}");
    }
}

/// Removes Ambit's tables (the redirect and the agent's exemption) from the pods' namespaces,
/// their agents stopped first (a running agent would reinstall them): the direct runs.
fn uncapture(pods: &[&ambit_tests::Pod]) -> Result<()> {
    for p in pods {
        let sock = p.ns.open().run(ambit_common::nft::NftSocket::open)??;
        ambit_common::redirect::remove(&sock)?;
    }
    Ok(())
}

/// How the progress lines name a variant: nothing, or that every process ran on CPU 0.
fn pinned_tag(pinned: bool) -> &'static str {
    if pinned { ", pinned to CPU 0" } else { "" }
}

/// Pins every thread of `pid` to CPU 0, or lets them run anywhere again.
fn pin_process(pid: u32, pinned: bool) -> Result<()> {
    let cpus = if pinned {
        "0".to_string()
    } else {
        format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
        )
    };
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpus, &pid.to_string()])
        .output()
        .context("taskset (util-linux)")?;
    anyhow::ensure!(
        out.status.success(),
        "taskset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A listener in `ns` with a deep accept queue: through a proxy, a burst of client connects
/// becomes a burst of upstream connects, and std's backlog of 128 would drop SYNs (each
/// dropped one waits a second or more to be retried), measuring the listener, not the path.
fn bind(ns: &Netns, port: u16) -> Result<TcpListener> {
    ns.run(|| -> std::io::Result<TcpListener> {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(4096)?;
        Ok(s.into())
    })
    .map_err(anyhow::Error::msg)?
    .with_context(|| format!("binding :{port}"))
}

/// Two namespaces named after `tag` joined by a veth pair: `devs[i]` with `addrs[i]` (CIDR)
/// in the i-th; the spikes' wire.
fn veth_pair(
    tag: &str,
    devs: [&str; 2],
    addrs: [&str; 2],
) -> Result<(ambit_tests::NsGuard, ambit_tests::NsGuard)> {
    let (a, b) = (
        ambit_tests::NsGuard::new(ambit_tests::unique(&format!("{tag}-a")))?,
        ambit_tests::NsGuard::new(ambit_tests::unique(&format!("{tag}-b")))?,
    );
    // Created in its namespaces directly: the names never exist in the host's.
    ambit_tests::run_ok(std::process::Command::new("ip").args([
        "link", "add", devs[0], "netns", &a.name, "type", "veth", "peer", "name", devs[1], "netns",
        &b.name,
    ]))?;
    for (ns, dev, addr) in [(&a, devs[0], addrs[0]), (&b, devs[1], addrs[1])] {
        ns.exec(&["ip", "addr", "add", addr, "dev", dev])?;
        ns.exec(&["ip", "link", "set", dev, "up"])?;
    }
    Ok((a, b))
}

/// A listener on `addr` in `ns`.
fn listen_in(ns: &Netns, addr: &str) -> Result<TcpListener> {
    let addr: SocketAddr = addr.parse()?;
    ns.run(|| TcpListener::bind(addr))
        .map_err(anyhow::Error::msg)?
        .context("binding a spike's listener")
}

/// Prints a spike's table and writes it (`--markdown`) and its runs (`--json`).
fn report_spike(args: &Args, table: &str, json: &Value) -> Result<()> {
    println!("{table}");
    if let Some(p) = &args.markdown {
        std::fs::write(p, table)?;
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(json)?)?;
    }
    Ok(())
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
fn sink(l: TcpListener, conns: usize, pinned: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if pinned {
            sys::pin_thread();
        }
        let mut buf = vec![0u8; 256 << 10];
        for _ in 0..conns {
            let Ok((mut c, _)) = l.accept() else { return };
            let n = count_to_eof(&mut c, &mut buf);
            let _ = c.write_all(&n.to_be_bytes());
        }
    })
}

/// Reads `from` into `buf` until its end (or an error); the bytes read.
fn count_to_eof(from: &mut impl Read, buf: &mut [u8]) -> u64 {
    let mut n = 0u64;
    while let Ok(k) = from.read(buf) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n
}

/// Serves `conns` connections, echoing everything until EOF, one thread per connection.
fn echo(l: TcpListener, conns: usize, pinned: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if pinned {
            sys::pin_thread();
        }
        for _ in 0..conns {
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                if pinned {
                    sys::pin_thread();
                }
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

/// Total throughput of `conns` connections writing at once for `seconds`, in Gbit/s. The
/// connections are opened first (a barrier), then every one writes 256 KiB chunks (of one
/// shared buffer, as the single-stream figure does) until the deadline; the server counts
/// what arrived. One single-threaded tokio runtime drives each
/// side (pinned with the caller when the caller is pinned), so the load generator's own
/// cost does not grow with the connection count.
fn throughput_many(
    client: &Netns,
    server: &Netns,
    dst: SocketAddr,
    conns: usize,
    seconds: f64,
    pinned: bool,
) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = bind(server, MANY_SINK_PORT)?;
    listener.set_nonblocking(true)?;
    let sink = std::thread::spawn(move || -> Result<u64> {
        if pinned {
            sys::pin_thread();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener)?;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..conns {
                let (mut c, _) = tokio::time::timeout(Duration::from_secs(30), l.accept())
                    .await
                    .context("accepting the parallel connections")??;
                tasks.spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut n = 0u64;
                    loop {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k as u64,
                        }
                    }
                    let _ = c.write_all(&n.to_be_bytes()).await;
                    n
                });
            }
            let mut total = 0;
            while let Some(n) = tasks.join_next().await {
                total += n?;
            }
            Ok(total)
        })
    });
    let streams = (0..conns)
        .map(|_| {
            let s = connect(client, dst)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    static CHUNK: [u8; 256 << 10] = [0x5a; 256 << 10];
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for s in streams {
            tasks.spawn(async move {
                let mut s = tokio::net::TcpStream::from_std(s)?;
                while start.elapsed() < limit {
                    s.write_all(&CHUNK).await?;
                }
                s.shutdown().await?;
                let mut n = [0u8; 8];
                s.read_exact(&mut n).await?;
                Ok::<_, std::io::Error>(())
            });
        }
        // Bounded: a stalled connection fails the figure instead of hanging the suite.
        let all = async {
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::time::timeout(limit + STALL_LIMIT, all)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "some of the {conns} connections stalled: not all data \
                                          arrived within {STALL_LIMIT:?} after the writers stopped"
                )
            })?
    })?;
    let secs = start.elapsed().as_secs_f64();
    let total = sink.join().expect("sink thread")?;
    Ok(total as f64 * 8.0 / secs / 1e9)
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

/// 1-byte round trips on one connection at `PACED_PER_SECOND` for `seconds` (each sent at
/// its time, or at once when the one before it came back late); returns the seconds taken.
fn paced(ns: &Netns, dst: SocketAddr, seconds: f64) -> Result<f64> {
    let mut s = connect(ns, dst)?;
    let period = Duration::from_secs(1) / PACED_PER_SECOND;
    let n = ((seconds * f64::from(PACED_PER_SECOND)) as u32).max(1);
    let mut b = [0u8; 1];
    let start = Instant::now();
    for i in 0..n {
        if let Some(wait) = (start + period * i).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
    }
    Ok(start.elapsed().as_secs_f64())
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

/// The server by its pod IP and by its Service VIP, medians of `--repeat` alternated runs.
struct ByVip {
    /// Single-stream Gbit/s (pod IP, VIP).
    gbps: (f64, f64),
    /// New-connection p50 in µs (pod IP, VIP).
    connect: (f64, f64),
}

fn service_vs_pod(
    args: &Args,
    client: &Netns,
    server: &Netns,
    pod: std::net::IpAddr,
) -> Result<ByVip> {
    let (mut gbps, mut connect) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..args.repeat {
        for (k, ip) in [pod, BENCH_VIP].into_iter().enumerate() {
            let s = sink(bind(server, SINK_PORT)?, 1, false);
            gbps[k].push(throughput(
                client,
                SocketAddr::new(ip, SINK_PORT),
                args.seconds,
            )?);
            s.join().ok();
            let e = echo(bind(server, ECHO_PORT)?, args.connections, false);
            let (p50, _) = connections(client, SocketAddr::new(ip, ECHO_PORT), args.connections)?;
            connect[k].push(p50);
            e.join().ok();
        }
    }
    let [gp, gv] = gbps.map(median);
    let [cp, cv] = connect.map(median);
    Ok(ByVip {
        gbps: (gp, gv),
        connect: (cp, cv),
    })
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

/// Nanoseconds every live thread of `pid` has run so far (`schedstat`): finer than
/// `cpu_seconds`' 10 ms ticks, for figures that use little CPU. The agent's threads live as
/// long as it does.
fn cpu_ns(pid: u32) -> u64 {
    per_thread(pid, "schedstat", |stat| {
        stat.split_whitespace().next()?.parse().ok()
    })
}

/// Context switches (voluntary + involuntary) of every live thread of `pid` so far.
fn ctx_switches(pid: u32) -> u64 {
    per_thread(pid, "status", |status| {
        let counts = status.lines().filter_map(|l| {
            l.strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        });
        Some(counts.filter_map(|v| v.trim().parse::<u64>().ok()).sum())
    })
}

/// The sum over every live thread of `pid` of what `read` finds in the thread's
/// `/proc/<pid>/task/<tid>/<file>` (a thread whose file cannot be read or parsed counts 0).
fn per_thread(pid: u32, file: &str, read: impl Fn(&str) -> Option<u64>) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| read(&std::fs::read_to_string(t.path().join(file)).ok()?))
        .sum()
}

/// The echo port of the next data-path run, one of its own per run. The new-connection
/// figure's client closes first, so each of its connections leaves a TIME_WAIT socket in the
/// client pod's namespace for 60 s, and `connect` picks a port by searching past those of the
/// same destination address and port. On one port for every run, a run paid for the runs
/// before it, and the direct run comes last: after 8,000 connections through Ambit, its new
/// connection p99 read 4,992 µs (370 µs on a port of its own; p50 190 and 184 µs), and
/// after 10,000 its p50 read 2,222 µs, the port search (`__inet_check_established`) a fifth
/// of the bench's CPU. No TIME_WAIT socket of an earlier run shares a destination with a new
/// run's connections; within a run, the kernel's search starts past the ports it just used.
fn run_echo_port() -> u16 {
    static RUNS: AtomicU16 = AtomicU16::new(0);
    RUN_ECHO_PORT_FIRST + RUNS.fetch_add(1, Ordering::Relaxed) % RUN_ECHO_PORTS
}

/// One run of every data-path figure. `agents`: the pids of the agents on the path, whose
/// CPU, context switches and RSS are read and summed (none: the direct run).
fn measure(
    args: &Args,
    client: &Netns,
    server: &Netns,
    ip: std::net::IpAddr,
    agents: &[u32],
    pinned: bool,
) -> Result<Figures> {
    let sink_srv = sink(bind(server, SINK_PORT)?, 1, pinned);
    let echo_port = run_echo_port();
    let echo_srv = echo(bind(server, echo_port)?, 3 + args.connections, pinned);
    let (sink_dst, echo_dst) = (
        SocketAddr::new(ip, SINK_PORT),
        SocketAddr::new(ip, echo_port),
    );
    // Memory an earlier figure freed goes back first (the reconcile pass); what it left
    // alive (pooled HBONE connections) is this run's starting level, reported as such.
    let measured = !agents.is_empty();
    if measured {
        std::thread::sleep(SETTLE);
    }
    let sampler = measured.then(|| RssPeak::start(agents));
    let rss_before_kib = sampler.as_ref().map_or(0, |s| s.before);
    let sum = |f: fn(u32) -> u64| agents.iter().map(|&p| f(p)).sum::<u64>();
    let cpu_s = || agents.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let (cpu0, cs0) = (cpu_s(), sum(ctx_switches));
    let t0 = Instant::now();
    let gbps = throughput(client, sink_dst, args.seconds).context("throughput")?;
    let wall = t0.elapsed().as_secs_f64();
    let rss_peak_kib = sampler.map_or(0, RssPeak::stop);
    let agent_cores = (cpu_s() - cpu0) / wall;
    let gigabytes = gbps * wall / 8.0;
    let ctx_per_gb = sum(ctx_switches).saturating_sub(cs0) as f64 / gigabytes.max(1e-9);
    let many_dst = SocketAddr::new(ip, MANY_SINK_PORT);
    let gbps_streams =
        throughput_many(client, server, many_dst, args.streams, args.seconds, pinned)
            .with_context(|| format!("throughput of {} streams", args.streams))?;
    let sampler = measured.then(|| RssPeak::start(agents));
    let gbps_many = throughput_many(client, server, many_dst, args.many, args.seconds, pinned)
        .with_context(|| format!("throughput of {} connections", args.many))?;
    let rss_many_peak_kib = sampler.map_or(0, RssPeak::stop);
    let rtt1 = ping_pong(client, echo_dst, 1, args.iterations).context("1 B round trips")?;
    let rtt1k = ping_pong(client, echo_dst, 1024, args.iterations).context("1 KiB round trips")?;
    let cpu0 = sum(cpu_ns);
    let connect = connections(client, echo_dst, args.connections).context("new connections")?;
    let connect_cpu_us =
        sum(cpu_ns).saturating_sub(cpu0) as f64 / 1e3 / args.connections.max(1) as f64;
    let cpu0 = sum(cpu_ns);
    let paced_secs = paced(client, echo_dst, args.seconds).context("paced round trips")?;
    let paced_cores = sum(cpu_ns).saturating_sub(cpu0) as f64 / 1e9 / paced_secs;
    sink_srv.join().ok();
    echo_srv.join().ok();
    Ok(Figures {
        gbps,
        gbps_streams,
        gbps_many,
        rtt1,
        rtt1k,
        connect,
        agent_cores,
        ctx_per_gb,
        rss_peak_kib,
        rss_before_kib,
        rss_many_peak_kib,
        paced_cores,
        connect_cpu_us,
        agents: agents.len(),
    })
}

/// `repeat` runs; the client side runs on this thread (pinned with the rest if asked).
fn runs(
    args: &Args,
    client: &Netns,
    server: &Netns,
    ip: std::net::IpAddr,
    agents: &[u32],
    pinned: bool,
) -> Result<Vec<Figures>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if pinned {
                sys::pin_thread();
            }
            (0..args.repeat)
                .map(|i| {
                    eprintln!("  run {}/{}", i + 1, args.repeat);
                    measure(args, client, server, ip, agents, pinned)
                })
                .collect()
        })
        .join()
        .expect("measurement thread")
    })
}

/// The agent's CPU per Gbit/s relayed in the single-stream figure.
fn core_per_gbit(f: &Figures) -> f64 {
    f.agent_cores / f.gbps.max(1e-9)
}

/// Runs of the data-path figures, one set per variant (unpinned, pinned).
type PerVariant = Vec<Vec<Figures>>;

/// The data-path figures through the agent binary `bin` and through this build's, alternated
/// run by run (which one goes first alternates as well), each run on freshly started agents
/// (one per node of `nodes`) that re-adopted the same pods: neither gets the machine's better
/// moments or what earlier figures left in an agent. Returns (this build's, the baseline's)
/// runs per variant; this build's agents, which ran last, keep running. When a run fails, the
/// last lines of each agent's log are printed, named by the agent binary and the node's place
/// in `nodes`.
fn alternated(
    args: &Args,
    nodes: &mut [&mut Node],
    bin: &std::path::Path,
    variants: &[bool],
    (client, server): (&Netns, &Netns),
    ip: std::net::IpAddr,
) -> Result<(PerVariant, PerVariant)> {
    let once = Args {
        repeat: 1,
        ..args.clone()
    };
    let (mut this, mut base) = (Vec::new(), Vec::new());
    // Each node's own arguments; the baseline's agents get `--baseline-agent-arg` behind them.
    let own: Vec<Vec<String>> = nodes.iter().map(|n| n.agent_args.clone()).collect();
    for &pinned in variants {
        let tag = pinned_tag(pinned);
        let (mut t, mut b) = (Vec::new(), Vec::new());
        for i in 0..args.repeat {
            // Which agent goes first alternates too (an A/A run, the same binary twice, read
            // the second slot 0.80-0.84x in pinned throughput when the order was fixed); the
            // last run is always this build's.
            let mut order = [(Some(bin.to_owned()), &mut b), (None, &mut t)];
            if (args.repeat - 1 - i) % 2 == 1 {
                order.reverse();
            }
            for (agent, out) in order {
                let name = agent
                    .as_ref()
                    .map_or("this build".into(), |p| p.display().to_string());
                eprintln!("  run {}/{} through {name}{tag}", i + 1, args.repeat);
                let mut run = || -> Result<Vec<Figures>> {
                    let mut pids = Vec::new();
                    for (node, own) in nodes.iter_mut().zip(&own) {
                        node.agent_args = own.clone();
                        if agent.is_some() {
                            node.agent_args
                                .extend(args.baseline_agent_args.iter().cloned());
                        }
                        node.restart_agent(agent.clone())?;
                        let pid = node.agent_pid().context("agent pid")?;
                        pin_process(pid, pinned)?;
                        pids.push(pid);
                    }
                    runs(&once, client, server, ip, &pids, pinned)
                };
                let figures = run().inspect_err(|_| {
                    for (i, node) in nodes.iter().enumerate() {
                        let which = format!("{name}: node {} of {}: agent", i + 1, nodes.len());
                        print_log_tail(&which, &node.agent_log());
                    }
                })?;
                out.extend(figures);
            }
        }
        this.push(t);
        base.push(b);
    }
    Ok((this, base))
}

/// Through the agents against direct, per variant: the Markdown rows and their JSON. `scope`
/// prefixes every figure's name (which topology it was measured on).
fn path_table(
    args: &Args,
    scope: &str,
    variants: &[bool],
    direct: &[Vec<Figures>],
    ambit: &[Vec<Figures>],
) -> (String, Vec<Value>) {
    let mut md = String::new();
    md.push_str(&format!(
        "| figure | direct (median of {}) | through Ambit | ratio |\n|---|---|---|---|\n",
        args.repeat
    ));
    let mut json_rows = Vec::new();
    for (i, &pinned) in variants.iter().enumerate() {
        let tag = if pinned { " (pinned, 1 vCPU)" } else { "" };
        for ((name, unit, d, d_all), (_, _, x, x_all)) in summarize(args, &direct[i])
            .into_iter()
            .zip(summarize(args, &ambit[i]))
        {
            md.push_str(&format!(
                "| {scope}{name}{tag} | {d:.2} {unit} | {x:.2} {unit} | {:.2}x |\n",
                x / d
            ));
            json_rows.push(json!({
                "figure": format!("{scope}{name}{tag}"), "unit": unit, "pinned": pinned,
                "direct": d, "ambit": x, "ratio": x / d,
                "direct_runs": d_all, "ambit_runs": x_all,
            }));
        }
        let med = |runs: &[Figures], f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
        let cores = med(&ambit[i], |f| f.agent_cores);
        let (per_gbit, ctx) = (
            med(&ambit[i], core_per_gbit),
            med(&ambit[i], |f| f.ctx_per_gb),
        );
        md.push_str(&format!(
            "| {scope}agent CPU during throughput{tag} | – | {cores:.2} cores ({per_gbit:.3} core per Gbit/s); {ctx:.0} context switches per GB | – |\n",
        ));
        // How many agents each run summed: the figure is the pair's only if it is 2.
        let agents: Vec<usize> = ambit[i].iter().map(|f| f.agents).collect();
        json_rows.push(
            json!({"figure": format!("{scope}agent cores during throughput{tag}"), "ambit": cores,
                   "core_per_gbps": per_gbit, "ctx_switches_per_gb": ctx, "pinned": pinned,
                   "agents": agents}),
        );
        // The agents' figures without a direct counterpart.
        let agent_only: [Row; 2] = [
            (PACED_ROW, "core", |f| f.paced_cores),
            (CONNECT_CPU_ROW, "µs", |f| f.connect_cpu_us),
        ];
        for (name, unit, pick) in agent_only {
            let (shown, decimals) = if unit == "core" {
                ("cores", 4)
            } else {
                (unit, 1)
            };
            let v = med(&ambit[i], pick);
            md.push_str(&format!(
                "| {scope}{name}{tag} | – | {v:.decimals$} {shown} | – |\n"
            ));
            json_rows.push(
                json!({"figure": format!("{scope}{name}{tag}"), "unit": unit,
                       "ambit": v, "pinned": pinned}),
            );
        }
        // Scaling: does throughput grow with parallel streams and connections?
        for (what, pick) in [
            (
                format!("{} streams", args.streams),
                (|f: &Figures| f.gbps_streams) as fn(&Figures) -> f64,
            ),
            (format!("{} connections", args.many), |f: &Figures| {
                f.gbps_many
            }),
        ] {
            let scale = |runs: &[Figures]| med(runs, pick) / med(runs, |f| f.gbps).max(1e-9);
            let (d, x) = (scale(&direct[i]), scale(&ambit[i]));
            md.push_str(&format!(
                "| {scope}scaling: {what} ÷ 1 stream{tag} | {d:.2}x | {x:.2}x | – |\n"
            ));
            json_rows.push(
                json!({"figure": format!("{scope}scaling, {what} / 1 stream{tag}"),
                       "direct_scaling": d, "ambit_scaling": x, "pinned": pinned}),
            );
        }
    }
    (md, json_rows)
}

/// This build against the baseline agent: a Markdown table and its JSON rows.
fn baseline_table(
    args: &Args,
    scope: &str,
    bin: &std::path::Path,
    variants: &[bool],
    ambit: &[Vec<Figures>],
    baseline: &[Vec<Figures>],
    direct: &[Vec<Figures>],
) -> (String, Vec<Value>) {
    let mut label = bin.display().to_string();
    for a in &args.baseline_agent_args {
        label.push(' ');
        label.push_str(a);
    }
    let mut md = format!(
        "\n| figure (same pods, same run; baseline {label}) | baseline agent | this build | this ÷ baseline |\n|---|---|---|---|\n"
    );
    let mut rows = Vec::new();
    let mut row = |name: String, unit: &str, b: f64, x: f64, b_all: Vec<f64>, x_all: Vec<f64>| {
        let r = ratio(b, x);
        let shown = r.map_or_else(|| "–".to_string(), |r| format!("{r:.2}x"));
        md.push_str(&format!(
            "| {name} | {b:.3} {unit} | {x:.3} {unit} | {shown} |\n"
        ));
        rows.push(
            json!({"figure": name, "unit": unit, "baseline": b, "this": x,
            "ratio": r, "baseline_runs": b_all, "this_runs": x_all}),
        );
    };
    for (i, &pinned) in variants.iter().enumerate() {
        let tag = if pinned { " (pinned, 1 vCPU)" } else { "" };
        let (b_rows, x_rows) = (summarize(args, &baseline[i]), summarize(args, &ambit[i]));
        for ((name, unit, b, b_all), (_, _, x, x_all)) in
            b_rows.iter().cloned().zip(x_rows.iter().cloned())
        {
            row(format!("{scope}{name}{tag}"), unit, b, x, b_all, x_all);
        }
        // The best run of each latency p50 beside the median: on a VM whose vCPUs have slow
        // modes a run's p50 can double for the same binary (an A/A run read 274-615 µs
        // pinned for a new connection), and the least disturbed run moves far less.
        for ((name, unit, _, b_all), (_, _, _, x_all)) in b_rows.iter().zip(&x_rows) {
            if latency_p50(name, unit) {
                row(
                    format!("{scope}{name}, best run{tag}"),
                    unit,
                    best(b_all),
                    best(x_all),
                    b_all.clone(),
                    x_all.clone(),
                );
            }
        }
        // What the agent adds to a latency: its median minus the direct median of the same
        // pods in the same run (the direct runs come after both agents' runs).
        for (((name, unit, d, _), (_, _, b, b_all)), (_, _, x, x_all)) in
            summarize(args, &direct[i])
                .into_iter()
                .zip(b_rows)
                .zip(x_rows)
        {
            if latency_p50(&name, unit) {
                let added = |v: &[f64]| v.iter().map(|t| t - d).collect::<Vec<f64>>();
                row(
                    format!("{scope}added {name} (over direct {d:.1} µs){tag}"),
                    unit,
                    b - d,
                    x - d,
                    added(&b_all),
                    added(&x_all),
                );
            }
        }
        let extra: [Row; 5] = [
            ("agent CPU per Gbit/s, 1 stream", "core", core_per_gbit),
            (PACED_ROW, "core", |f| f.paced_cores),
            (CONNECT_CPU_ROW, "µs", |f| f.connect_cpu_us),
            ("agent context switches per GB, 1 stream", "", |f| {
                f.ctx_per_gb
            }),
            ("agent RSS peak, 1 stream", "MB", |f| {
                f.rss_peak_kib as f64 / 1024.0
            }),
        ];
        for (name, unit, f) in extra {
            let all = |runs: &[Figures]| runs.iter().map(f).collect::<Vec<f64>>();
            let (b_all, x_all) = (all(&baseline[i]), all(&ambit[i]));
            let (b, x) = (median(b_all.clone()), median(x_all.clone()));
            row(format!("{scope}{name}{tag}"), unit, b, x, b_all, x_all);
        }
    }
    (md, rows)
}

/// The light-load figure's name.
const PACED_ROW: &str = "agent CPU at 1,000 round trips/s (1 B)";
/// The new-connection CPU figure's name.
const CONNECT_CPU_ROW: &str = "agent CPU per new connection";

/// Whether a figure is a latency's median (the rows that get a best run and an added row).
fn latency_p50(name: &str, unit: &str) -> bool {
    unit == "µs" && name.ends_with("p50")
}

/// The lowest of a latency's runs (the least disturbed one).
fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(f64::INFINITY, f64::min)
}

/// This build ÷ baseline, when both figures are above zero. An added latency is not when the
/// direct run of the same pods was slower than either agent's (this VM's direct round trip is
/// bimodal, ~10 or ~110 µs between runs): no ratio means something there, a ratio of two
/// negative numbers would not.
fn ratio(baseline: f64, this: f64) -> Option<f64> {
    (baseline > 0.0 && this > 0.0).then(|| this / baseline)
}

/// A reported figure: name, unit, and how to read it off one run.
type Row<'a> = (&'a str, &'static str, fn(&Figures) -> f64);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The figures of a set of runs, by name: (name, unit, median, every run).
fn summarize(args: &Args, runs: &[Figures]) -> Vec<(String, &'static str, f64, Vec<f64>)> {
    let pick = |f: fn(&Figures) -> f64| {
        let all: Vec<f64> = runs.iter().map(f).collect();
        (median(all.clone()), all)
    };
    let streams = format!("throughput, {} streams", args.streams);
    let many = format!("throughput, {} concurrent connections", args.many);
    let rows: [Row; 9] = [
        ("throughput, 1 stream", "Gbit/s", |f| f.gbps),
        (&streams, "Gbit/s", |f| f.gbps_streams),
        (&many, "Gbit/s", |f| f.gbps_many),
        ("RTT 1 B p50", "µs", |f| f.rtt1.0),
        ("RTT 1 B p99", "µs", |f| f.rtt1.1),
        ("RTT 1 KiB p50", "µs", |f| f.rtt1k.0),
        ("RTT 1 KiB p99", "µs", |f| f.rtt1k.1),
        ("new conn + 1 B echo p50", "µs", |f| f.connect.0),
        ("new conn + 1 B echo p99", "µs", |f| f.connect.1),
    ];
    rows.into_iter()
        .map(|(n, u, f)| {
            let (m, all) = pick(f);
            (n.to_string(), u, m, all)
        })
        .collect()
}

fn p50_p99_ms(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0);
    }
    (pct(&v, 0.5), pct(&v, 0.99))
}

/// The same-node figures: client and server pod on one node, one agent doing both halves of
/// every connection; and the node's other figures (CNI ADD, RSS by captured pods, Services
/// and pods at scale). The Markdown report and its JSON keys.
fn same_node(args: &Args, variants: &[bool]) -> Result<(String, Value)> {
    let mut node = Node::new("1.0.0")?;
    let manifests = node.dir.0.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    node.agent_args = PRODUCTION_ARGS
        .into_iter()
        .map(String::from)
        .chain([
            "--manifests-poll-seconds".into(),
            "0.1".into(),
            "--manifests-dir".into(),
            manifests.display().to_string(),
            // A node none of the pods-at-scale runs on (they are spread over node-0..499):
            // remote pods, as a cluster's are to every agent but one. The bench's own pods
            // name no node and keep their labels.
            "--node-name".into(),
            "bench-node".into(),
        ])
        .chain(args.agent_args.iter().cloned())
        .collect();
    node.start_agent()?;
    let a = node.add_pod("bench-client")?;
    let b = node.add_pod("bench-server")?;
    // Declared like a cluster's Pods: the agent serves inbound only to pods it knows.
    ambit_tests::mesh::write_pod_manifest(&manifests, &a, "bench-client", true);
    ambit_tests::mesh::write_pod_manifest(&manifests, &b, "bench-server", true);
    ambit_tests::mesh::wait_manifest_pods(&node, 2);
    let (ca, cb) = (a.ns.open(), b.ns.open());
    let mut pid = node.agent_pid().context("agent pid")?;
    eprintln!("pods: client {} -> server {}", a.ip, b.ip);

    // First, on a fresh agent: CNI ADD latency of the whole chain, and RSS as captured idle
    // pods accumulate (then they are deleted again).
    eprintln!(
        "CNI ADD latency ({} pods) and RSS at {:?} captured pods...",
        args.add_pods, args.rss_pods
    );
    let mut extra = Vec::new();
    let mut add_ms = Vec::new();
    let mut rss_at = Vec::new();
    let max_pods = args
        .rss_pods
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(args.add_pods);
    for n in 0..=max_pods {
        if args.rss_pods.contains(&n) {
            std::thread::sleep(Duration::from_millis(500));
            rss_at.push((n, rss_kib(pid)));
        }
        if n == max_pods {
            break;
        }
        let p = node.add_pod(&format!("idle{n}"))?;
        if n < args.add_pods {
            add_ms.push(p.add_time.as_secs_f64() * 1e3);
        }
        extra.push(p);
    }
    let add = p50_p99_ms(add_ms);
    // Back to the two bench pods, so the data path is measured as it was.
    for p in extra.drain(..) {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_UID=uid-{}",
            p.name, p.name
        );
        let out = node.cnitool("del", &p.ns, &p.container_id, &args);
        anyhow::ensure!(
            out.status.success(),
            "DEL {}: {}",
            p.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let rss_idle = rss_kib(pid);
    let mut ambit = Vec::new();
    // With a baseline, the two agents alternate run by run.
    let baseline = match &args.baseline_agent {
        Some(bin) => {
            eprintln!("through Ambit and through the baseline agent, alternated...");
            let (this, base) = alternated(args, &mut [&mut node], bin, variants, (&ca, &cb), b.ip)?;
            ambit = this;
            pid = node.agent_pid().context("agent pid")?;
            Some(base)
        }
        None => None,
    };
    for &pinned in variants.iter().filter(|_| baseline.is_none()) {
        eprintln!("through Ambit (HBONE, same node){}...", pinned_tag(pinned));
        pin_process(pid, pinned)?;
        match runs(args, &ca, &cb, b.ip, &[pid], pinned) {
            Ok(r) => ambit.push(r),
            Err(e) => {
                print_log_tail("agent", &node.agent_log());
                return Err(e);
            }
        }
    }
    pin_process(pid, false)?;
    let log = node.agent_log();
    anyhow::ensure!(
        log.contains("protocol=\"hbone\""),
        "the measured traffic did not go through HBONE"
    );
    std::thread::sleep(SETTLE);
    let rss_after = rss_kib(pid);

    // Services at scale: in process, then on this agent (the set loaded), then the server
    // called by its Service VIP next to its pod IP with the whole set loaded.
    eprintln!(
        "Services: {} with {} endpoints each...",
        args.services, args.endpoints_per_service
    );
    let work = node.dir.0.join("services-work");
    let store_rows = services::store_figures(&work, args.services, args.endpoints_per_service)?;
    ambit_tests::mesh::write_service(
        &manifests,
        "default",
        "bench-server",
        &[BENCH_VIP],
        &[("sink", SINK_PORT, "sink"), ("echo", ECHO_PORT, "echo")],
        json!({}),
    );
    ambit_tests::mesh::write_endpoint_slice(
        &manifests,
        "default",
        "bench-server-1",
        "bench-server",
        false,
        &[("sink", SINK_PORT), ("echo", ECHO_PORT)],
        &[b.ip],
    );
    let loaded = |n: usize| node.agent_log().contains(&format!("services={n} "));
    ambit_tests::wait_for(Duration::from_secs(10), || loaded(1))?;
    let agent_svc = services::agent_figures(
        &manifests,
        args.services,
        args.endpoints_per_service,
        || rss_kib(pid),
        loaded,
        SETTLE,
    )?;
    let by_vip = service_vs_pod(args, &ca, &cb, b.ip)?;

    // Pods at scale on this agent: a manifests file of N remote pods.
    eprintln!("pods at scale: {:?} remote pods...", args.scale_pods);
    let agent_pods = pods::agent_figures(
        &manifests,
        &args.scale_pods,
        || rss_kib(pid),
        || node.agent_log(),
        SETTLE,
    )?;

    // The same pods without capture: the agent stopped (it would reinstall the rules) and
    // Ambit's tables (redirect and the agent's exemption) removed from both namespaces.
    node.kill_agent();
    uncapture(&[&a, &b])?;
    let mut direct = Vec::new();
    for &pinned in variants {
        eprintln!("direct (capture rules removed){}...", pinned_tag(pinned));
        direct.push(runs(args, &ca, &cb, b.ip, &[], pinned)?);
    }

    // The store under churn, in process (no agent, no pods involved).
    eprintln!(
        "pods at scale: {} pods through the Kubernetes source, {} events/s for {} s...",
        args.churn_pods, args.churn_rate, args.churn_seconds
    );
    let churn = pods::churn_figures(args.churn_pods, args.churn_rate, args.churn_seconds)?;

    // The report.
    let (mut md, json_rows) = path_table(args, "", variants, &direct, &ambit);
    let peak = |f: fn(&Figures) -> u64| ambit.iter().flatten().map(f).max().unwrap_or(0);
    let (rss_peak, rss_many_peak) = (peak(|f| f.rss_peak_kib), peak(|f| f.rss_many_peak_kib));
    // The first run's peak is the figure's own; later runs start from what the earlier
    // figures left (the pooled HBONE connections the many-connection figure opened, with the
    // tables it grew in them, until the pool closes them), so they are reported as the rise
    // over their starting level.
    let first_peak = ambit.iter().flatten().next().map_or(0, |f| f.rss_peak_kib);
    let mut rises: Vec<u64> = ambit
        .iter()
        .flatten()
        .map(|f| f.rss_peak_kib.saturating_sub(f.rss_before_kib))
        .collect();
    rises.sort_unstable();
    let rise = rises.get(rises.len() / 2).copied().unwrap_or(0);
    md.push_str(&format!(
        "| agent RSS idle / peak during the first 1-stream run / after all figures | – | {:.1} / {:.1} / {:.1} MB | – |\n",
        rss_idle as f64 / 1024.0,
        first_peak as f64 / 1024.0,
        rss_after as f64 / 1024.0
    ));
    md.push_str(&format!(
        "| agent RSS during any 1-stream run: highest peak; median rise over its start | – | {:.1} MB; +{:.1} MB | – |\n",
        rss_peak as f64 / 1024.0,
        rise as f64 / 1024.0
    ));
    md.push_str(&format!(
        "| agent RSS peak during {} concurrent connections | – | {:.1} MB | – |\n",
        args.many,
        rss_many_peak as f64 / 1024.0
    ));
    for (n, kib) in &rss_at {
        md.push_str(&format!(
            "| agent RSS with {n} more idle captured pods (+2 bench pods), before any traffic | – | {:.1} MB | – |\n",
            *kib as f64 / 1024.0
        ));
    }
    md.push_str(&format!(
        "| CNI ADD of the whole chain via libcni, {} pods, p50 / p99 | – | {:.1} / {:.1} ms | – |\n",
        args.add_pods, add.0, add.1
    ));
    md.push_str(&services::store_rows(&store_rows));
    md.push_str(&format!(
        "| Services: agent RSS growth with {} Services / {} endpoints; served after the files appeared (0.1 s poll) | – | +{:.1} MB; {:.2} s | – |\n",
        args.services,
        args.services * args.endpoints_per_service,
        agent_svc["rss_growth_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        agent_svc["served_after_s"].as_f64().unwrap_or(0.0),
    ));
    for (name, unit, pod, vip) in [
        (
            "throughput, 1 stream",
            "Gbit/s",
            by_vip.gbps.0,
            by_vip.gbps.1,
        ),
        (
            "new connection p50",
            "µs",
            by_vip.connect.0,
            by_vip.connect.1,
        ),
    ] {
        md.push_str(&format!(
            "| Services: {name}, by pod IP vs by Service VIP ({} Services loaded) | {pod:.2} {unit} | {vip:.2} {unit} | {:.2}x |\n",
            args.services,
            vip / pod.max(1e-9)
        ));
    }
    md.push_str(&pods::rows(&agent_pods, &churn));
    let mut baseline_json = Vec::new();
    if let (Some(b), Some(bin)) = (&baseline, &args.baseline_agent) {
        let (table, rows) = baseline_table(args, "", bin, variants, &ambit, b, &direct);
        md.push_str(&table);
        baseline_json = rows;
    }
    let out: Value = json!({
        "figures": json_rows,
        "baseline": baseline_json,
        "agent_rss_kib": {"idle": rss_idle, "peak_during_throughput": rss_peak,
                          "peak_during_first_throughput": first_peak,
                          "rise_during_throughput_median": rise,
                          "peak_during_many": rss_many_peak, "after": rss_after,
                          "by_pods": rss_at.iter().map(|(n, k)| json!({"pods": n, "kib": k})).collect::<Vec<_>>()},
        "cni_add_ms": {"pods": args.add_pods, "p50": add.0, "p99": add.1},
        "services": {"store": store_rows, "agent": agent_svc,
                     "vip_vs_pod": {"gbps_pod": by_vip.gbps.0, "gbps_vip": by_vip.gbps.1,
                                    "connect_p50_us_pod": by_vip.connect.0,
                                    "connect_p50_us_vip": by_vip.connect.1,
                                    "runs": args.repeat}},
        "pods": {"agent": agent_pods, "churn": churn},
    });
    Ok((md, out))
}

fn main() -> Result<()> {
    let args = Args::parse().effective();
    if args.store_only {
        let work = std::env::temp_dir().join(format!("ambit-bench-store-{}", std::process::id()));
        let rows = services::store_figures(&work, args.services, args.endpoints_per_service);
        let _ = std::fs::remove_dir_all(&work);
        println!("{}", services::store_rows(&rows?));
        let churn = pods::churn_figures(args.churn_pods, args.churn_rate, args.churn_seconds)?;
        println!("{}", pods::rows(&[], &churn));
        return Ok(());
    }
    require_root();
    if args.sockmap_spike {
        let spike = sockmap::spike(args.seconds, args.iterations, args.repeat)?;
        return report_spike(&args, &sockmap::table(&spike), &sockmap::json(&spike));
    }
    if args.ktls_spike {
        let spike = ktls::spike(args.seconds, args.repeat)?;
        return report_spike(&args, &ktls::table(&spike), &ktls::json(&spike));
    }
    if std::env::var("AMBIT_PROFILE").as_deref() != Ok("release") {
        eprintln!(
            "note: AMBIT_PROFILE is not 'release': the agent is a debug build (bench/run.sh sets it)"
        );
    }
    let variants: Vec<bool> = if args.no_pinned {
        vec![false]
    } else {
        vec![false, true]
    };
    let mut md = String::new();
    let topology: Vec<String> = args
        .topology
        .iter()
        .filter_map(|t| Some(t.to_possible_value()?.get_name().to_owned()))
        .collect();
    let mut out = json!({
        "settings": {"seconds": args.seconds, "iterations": args.iterations,
                     "connections": args.connections, "repeat": args.repeat,
                     "agent_args": args.agent_args,
                     "baseline_agent_args": args.baseline_agent_args, "smoke": args.smoke,
                     "topology": topology},
    });
    if args.topology.contains(&Topology::SameNode) {
        let (m, j) = same_node(&args, &variants)?;
        md.push_str(&m);
        if let (Value::Object(out), Value::Object(j)) = (&mut out, j) {
            out.extend(j);
        }
    }
    if args.topology.contains(&Topology::CrossNode) {
        let (m, j) = cross::figures(&args, &variants)?;
        md.push_str(&m);
        out["cross_node"] = j;
    }
    println!("\n{md}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &md)?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Args, best, median, ratio};
    use clap::Parser;

    /// Arguments for the baseline's agents alone come with a baseline agent, hyphens and all.
    #[test]
    fn baseline_agent_arguments_need_a_baseline_agent() {
        let Err(e) =
            Args::try_parse_from(["ambit-bench", "--baseline-agent-arg=--worker-spin-us=0"])
        else {
            panic!("--baseline-agent-arg was taken without --baseline-agent");
        };
        assert_eq!(
            e.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{e}"
        );
        let a = Args::try_parse_from([
            "ambit-bench",
            "--baseline-agent",
            "/bin/agent",
            "--baseline-agent-arg",
            "--worker-spin-us=0",
            "--baseline-agent-arg=--log=debug",
        ])
        .unwrap();
        assert_eq!(a.baseline_agent_args, ["--worker-spin-us=0", "--log=debug"]);
    }

    #[test]
    fn the_best_run_is_the_lowest_and_the_median_the_middle() {
        let runs = [477.0, 274.0, 348.0, 277.0, 595.0, 615.0, 562.0];
        assert_eq!(best(&runs), 274.0);
        assert_eq!(median(runs.to_vec()), 477.0);
    }

    #[test]
    fn a_ratio_needs_both_figures_above_zero() {
        assert_eq!(ratio(2.0, 1.0), Some(0.5));
        // Two added latencies below zero (the direct run was slower than both agents).
        assert_eq!(ratio(-29.2, -28.5), None);
        assert_eq!(ratio(12.0, -3.0), None);
        assert_eq!(ratio(0.0, 5.0), None);
    }
}
