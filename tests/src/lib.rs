//! Test harness: node and pod network namespaces, the real `bridge` + `host-local` plugins,
//! `ambit-cni` and `ambit-agent` as built binaries, and a libcni client built from source.
//!
//! Every namespace, bridge, subnet and directory gets a unique name, and every resource is an
//! RAII guard, so a failing test cleans up too. Tests need root: they fail (never skip) without
//! it. Plain forwarding of test traffic stays inside namespaces the test created.

#![forbid(unsafe_code)]

pub mod mesh;
pub mod pcap;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ambit_common::netns::Netns;
use anyhow::{Context, Result, bail, ensure};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique on this machine for this run: `<prefix><pid><n>` (fits IFNAMSIZ).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Fails the test when not root: these tests cannot run without privileges, and must not be
/// silently skipped.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and must run as root (CI runs it as root)"
    );
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    Ok(out)
}

pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Paths of the Ambit binaries, built once per test process.
pub struct Bins {
    pub cni: PathBuf,
    pub agent: PathBuf,
    pub install: PathBuf,
}

pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // AMBIT_PROFILE=release builds optimised binaries (benchmarks and measurements).
        let release = std::env::var("AMBIT_PROFILE").is_ok_and(|p| p == "release");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "--locked",
            "-p",
            "ambit-cni",
            "-p",
            "ambit-agent",
            "-p",
            "ambit-install",
        ]);
        if release {
            cmd.arg("--release");
        }
        // A caller that built them in its own cargo invocation (bench/run.sh builds the bench
        // and the binaries together) says so: building them again here, with the feature set
        // of a smaller package selection, would rebuild shared dependencies both times.
        if std::env::var_os("AMBIT_BINS_BUILT").is_none() {
            run_ok(&mut cmd).expect("building ambit-cni, ambit-agent and ambit-install");
        }
        let dir = target_dir().join(if release { "release" } else { "debug" });
        Bins {
            cni: dir.join("ambit-cni"),
            agent: dir.join("ambit-agent"),
            install: dir.join("ambit-install"),
        }
    })
}

/// The libcni client (tests/cnitool/main.go) built against Debian's libcni, once per process.
pub fn cnitool() -> &'static Path {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(|| {
        let base = target_dir().join("cnitool");
        let src = base.join("gopath/src/cnitool");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::copy(
            workspace_root().join("tests/cnitool/main.go"),
            src.join("main.go"),
        )
        .unwrap();
        // Built under a name of this process, then renamed over the shared one (atomic; a
        // process still running the old file keeps it): one binary on disk, however many
        // test processes built it.
        let built = base.join(format!("cnitool-{}", std::process::id()));
        let out = base.join("cnitool");
        run_ok(
            Command::new("go")
                .args(["build", "-o"])
                .arg(&built)
                .arg("cnitool")
                .env("GO111MODULE", "off")
                .env(
                    "GOPATH",
                    format!("{}:/usr/share/gocode", base.join("gopath").display()),
                )
                .env("GOCACHE", base.join("gocache"))
                .env("GOFLAGS", "-mod=mod"),
        )
        .expect("building the libcni client (needs golang-go and golang-github-appc-cni-dev)");
        std::fs::rename(&built, &out).expect("renaming the libcni client into place");
        out
    })
}

/// A named network namespace, deleted on drop.
pub struct NsGuard {
    pub name: String,
}

impl NsGuard {
    pub fn new(name: String) -> Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let g = Self { name };
        run_ok(Command::new("ip").args(["-n", &g.name, "link", "set", "lo", "up"]))?;
        Ok(g)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    pub fn open(&self) -> Netns {
        Netns::open(&self.path()).expect("opening a test namespace")
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A cgroup (v2) of its own for an agent, as the DaemonSet's container gives it; whatever
/// still runs in it is killed (`cgroup.kill`) and the cgroup removed on drop.
pub struct CgroupGuard(pub PathBuf);

impl CgroupGuard {
    pub fn new(tag: &str) -> Result<Self> {
        let root = ambit_agent::cgroup::unified_root()
            .context("the agent needs a cgroup v2 hierarchy (unified or hybrid)")?;
        let dir = root.join(format!("ambit-test-{}", unique(tag)));
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// A command that joins this cgroup, then execs `program` (same pid).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
            .arg(&self.0)
            .arg(program);
        c
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ambit-test-{}", unique(tag)));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node: a network namespace with a CNI bridge, a conflist chaining `ambit-cni` after
/// `bridge`, and (optionally running) an `ambit-agent`.
pub struct Node {
    pub ns: NsGuard,
    pub dir: TempDir,
    pub net: String,
    pub bridge: String,
    pub subnet: String,
    /// The pods' IPv6 subnet, on a dual-stack node.
    pub subnet6: Option<String>,
    pub cni_version: String,
    /// Extra arguments for every agent start (CA, trust domain, manifests...).
    pub agent_args: Vec<String>,
    /// The agent binary to run instead of the one built (the bench's baseline build).
    pub agent_binary: Option<PathBuf>,
    agent: Option<Child>,
    pods: Vec<String>,
    /// The agents' cgroups: the first for [`Node::start_agent`], one more per second agent.
    cgroups: Mutex<Vec<CgroupGuard>>,
}

/// A pod created through the CNI chain.
pub struct Pod {
    pub ns: NsGuard,
    pub name: String,
    pub namespace: String,
    pub container_id: String,
    pub ip: IpAddr,
    /// Every address of the pod (IPv4 first, then IPv6 on a dual-stack node).
    pub ips: Vec<IpAddr>,
    /// How long the libcni ADD of the whole chain took.
    pub add_time: Duration,
}

fn subnet_prefix() -> String {
    // 10.<100..=249>.<n>.0/24: unique per process and node within this run.
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("10.{}.{}", 100 + std::process::id() % 150, n % 250)
}

impl Node {
    pub fn new(cni_version: &str) -> Result<Self> {
        Self::with_plugin_conf(cni_version, serde_json::json!({}))
    }

    /// A node (CNI 1.0.0) whose agent runs with `args`, started.
    pub fn with_agent(args: Vec<String>) -> Self {
        let mut node = Self::new("1.0.0").unwrap();
        node.agent_args = args;
        node.start_agent().unwrap();
        node
    }

    /// A node whose pods get an IPv4 and an IPv6 address.
    pub fn dual_stack(cni_version: &str) -> Result<Self> {
        Self::create(cni_version, serde_json::json!({}), true)
    }

    /// `extra` is merged into ambit-cni's entry in the conflist.
    pub fn with_plugin_conf(cni_version: &str, extra: serde_json::Value) -> Result<Self> {
        Self::create(cni_version, extra, false)
    }

    fn create(cni_version: &str, extra: serde_json::Value, dual_stack: bool) -> Result<Self> {
        require_root();
        let bins = bins();
        // Built (or found built) now, so no pod's ADD time includes it.
        cnitool();
        let ns = NsGuard::new(unique("amn"))?;
        let dir = TempDir::new("node");
        let bridge = unique("ab");
        let prefix = subnet_prefix();
        let net = unique("anet");
        for d in ["net.d", "bin", "cache", "ipam"] {
            std::fs::create_dir_all(dir.0.join(d))?;
        }
        std::os::unix::fs::symlink(&bins.cni, dir.0.join("bin/ambit-cni"))?;
        let mut plugin = serde_json::json!({
            "type": "ambit-cni",
            "agentSocket": dir.0.join("agent.sock"),
            "agentTimeoutSeconds": 5,
            "logLevel": "debug",
            "logFile": dir.0.join("cni.log"),
            "logStderr": false,
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        });
        if let (Some(p), Some(e)) = (plugin.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        let mut ranges = vec![serde_json::json!([{"subnet": format!("{prefix}.0/24")}])];
        let mut routes = vec![serde_json::json!({"dst": "0.0.0.0/0"})];
        // fdXX:YYYY:ZZ::/64 mirrors the IPv4 prefix, so it is as unique.
        let subnet6 = dual_stack.then(|| {
            let p: Vec<&str> = prefix.split('.').collect();
            format!("fd00:a:{}:{}::/64", p[1], p[2])
        });
        if let Some(s6) = &subnet6 {
            ranges.push(serde_json::json!([{"subnet": s6}]));
            routes.push(serde_json::json!({"dst": "::/0"}));
        }
        let conf = serde_json::json!({
            "cniVersion": cni_version,
            "name": net,
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false, "hairpinMode": true,
                 "ipam": {"type": "host-local", "ranges": ranges,
                          "routes": routes, "dataDir": dir.0.join("ipam")}},
                plugin,
            ]
        });
        std::fs::write(
            dir.0.join("net.d/10-ambit-test.conflist"),
            serde_json::to_vec_pretty(&conf)?,
        )?;
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]))?;
        Ok(Self {
            ns,
            dir,
            net,
            bridge,
            subnet: format!("{prefix}.0/24"),
            subnet6,
            cni_version: cni_version.into(),
            agent_args: Vec::new(),
            agent_binary: None,
            agent: None,
            pods: Vec::new(),
            cgroups: Mutex::new(Vec::new()),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.0.join("agent.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }

    /// The agent's log, read once it has been quiet for a moment ([`settled_log`]).
    pub fn agent_log(&self) -> String {
        settled_log(&self.dir.0.join("agent.log"))
    }

    pub fn cni_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("cni.log")).unwrap_or_default()
    }

    /// Spawns `ambit-agent` in the node namespace on the node's socket and state directory,
    /// logging to `log`, with `extra` arguments before the node's `agent_args`.
    fn spawn_agent(&self, log: std::fs::File, extra: &[String], cgroup: usize) -> Result<Child> {
        let mut cgroups = self.cgroups.lock().unwrap_or_else(|p| p.into_inner());
        while cgroups.len() <= cgroup {
            let tag = format!("agent{}", cgroups.len());
            cgroups.push(CgroupGuard::new(&tag)?);
        }
        Ok(cgroups[cgroup]
            .command("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(self.agent_binary.as_ref().unwrap_or(&bins().agent))
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--log", "debug", "--reconcile-seconds", "0.5"])
            .args(extra)
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    }

    /// Starts the agent inside the node namespace and waits until its socket exists.
    pub fn start_agent(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("agent.log"))?;
        self.start_agent_with_stderr(log)
    }

    /// [`Node::start_agent`] with `stderr` as the agent's stderr instead of its log file
    /// (which [`Node::agent_log`] then does not see).
    pub fn start_agent_with_stderr(&mut self, stderr: std::fs::File) -> Result<()> {
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let child = self.spawn_agent(stderr, &[], 0)?;
        let agent = self.agent.insert(child);
        // An agent that exits at once (a bad flag, a broken baseline build) fails the start
        // now, with its status, rather than after the whole wait.
        let mut exited = None;
        wait_for(Duration::from_secs(10), || {
            exited = agent.try_wait().ok().flatten();
            exited.is_some() || socket.exists()
        })
        .context("the agent did not create its socket")?;
        if let Some(status) = exited {
            let when = if socket.exists() {
                "as it started"
            } else {
                "before it created its socket"
            };
            bail!("the agent exited ({status}) {when}");
        }
        Ok(())
    }

    /// Starts a second agent on the same socket and state directory (a surge upgrade: the
    /// DaemonSet's new pod beside the old one), in a cgroup of its own like a new pod's
    /// container, with its own endpoint addresses and log (`agent-<tag>.log`). The caller owns
    /// (and must stop) the process.
    pub fn start_second_agent(&self, tag: &str, port_base: u16) -> Result<Child> {
        let log = std::fs::File::create(self.dir.0.join(format!("agent-{tag}.log")))?;
        let next = self
            .cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            .max(1);
        self.spawn_agent(
            log,
            &[
                format!("--metrics-address=127.0.0.1:{port_base}"),
                format!("--readiness-address=127.0.0.1:{}", port_base + 1),
                format!("--admin-address=127.0.0.1:{}", port_base + 2),
            ],
            next,
        )
    }

    /// The log of the agent started as `tag`, read once it has been quiet for a moment
    /// ([`settled_log`]).
    pub fn log_of(&self, tag: &str) -> String {
        settled_log(&self.dir.0.join(format!("agent-{tag}.log")))
    }

    /// The agent's pid (`ip netns exec` execs it in place).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The agent's resident set size in KiB.
    pub fn agent_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.agent_pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// SIGKILLs the agent (the crash case).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the libcni client inside the node namespace.
    pub fn cnitool(&self, op: &str, pod_ns: &NsGuard, container_id: &str, args: &str) -> Output {
        self.cnitool_with(op, pod_ns, container_id, args, &[])
    }

    /// [`Node::cnitool`] with extra environment, e.g. `CAP_ARGS`.
    pub fn cnitool_with(
        &self,
        op: &str,
        pod_ns: &NsGuard,
        container_id: &str,
        args: &str,
        extra: &[(&str, &str)],
    ) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(cnitool())
            .args([op, &self.net])
            .arg(pod_ns.path())
            .env("NETCONFPATH", self.dir.0.join("net.d"))
            .env(
                "CNI_PATH",
                format!("/usr/lib/cni:{}", self.dir.0.join("bin").display()),
            )
            .env("CNI_CACHEDIR", self.dir.0.join("cache"))
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_ARGS", args)
            .envs(extra.iter().copied())
            .output()
            .expect("running cnitool")
    }

    /// Creates a pod namespace and ADDs it through libcni (namespace `default`).
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        self.add_pod_in("default", name)
    }

    /// Creates a pod namespace and ADDs it through libcni as `namespace/name`.
    pub fn add_pod_in(&mut self, namespace: &str, name: &str) -> Result<Pod> {
        let ns = NsGuard::new(unique("ap"))?;
        let container_id = format!("c{}", unique(name).replace('x', "0"));
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"
        );
        let started = Instant::now();
        let out = self.cnitool("add", &ns, &container_id, &args);
        let add_time = started.elapsed();
        ensure!(
            out.status.success(),
            "ADD {name} failed: {}{}\ncni log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.cni_log()
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut ips: Vec<IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        let ip = *ips.first().context("ADD result has no IP")?;
        self.pods.push(container_id.clone());
        Ok(Pod {
            ns,
            name: name.into(),
            namespace: namespace.into(),
            container_id,
            ip,
            ips,
            add_time,
        })
    }

    pub fn pod_args(pod: &Pod) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_UID=uid-{}",
            pod.name, pod.name
        )
    }

    /// Runs the plugin binary directly with the spec's environment (STATUS/GC, bad input).
    pub fn invoke_plugin(&self, env: &[(&str, &str)], stdin: &[u8]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name])
            .arg(&bins().cni)
            .env_remove("CNI_COMMAND")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning ambit-cni");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// The plugin's own entry of the conflist, as libcni would hand it over.
    pub fn plugin_conf(&self) -> serde_json::Value {
        let list: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.dir.0.join("net.d/10-ambit-test.conflist")).unwrap(),
        )
        .unwrap();
        let mut p = list["plugins"][1].clone();
        p["cniVersion"] = list["cniVersion"].clone();
        p["name"] = list["name"].clone();
        p
    }

    /// Container ids the agent has recorded in its state directory.
    pub fn recorded_pods(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state_dir())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("pod-")?
                            .strip_suffix(".json")
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        // The bridge lives in the node namespace and dies with it; IPAM and cache are in dir.
    }
}

/// Packs a minimal busybox root filesystem (Debian's static busybox, the given applets and
/// extra files) into `dir/<name>.tar`, for podman/containerd images made offline.
pub fn busybox_rootfs_tar(
    dir: &Path,
    name: &str,
    applets: &[&str],
    files: &[(&str, &str)],
) -> PathBuf {
    let rootfs = dir.join(format!("{name}-rootfs"));
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static is installed");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    for (path, content) in files {
        let p = rootfs.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let tar = dir.join(format!("{name}.tar"));
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )
    .unwrap();
    tar
}

/// Polls `f` every 20 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("condition not met within {limit:?}")
}

/// [`wait_for`] inside a test's own runtime: it sleeps asynchronously between polls, so the
/// runtime's other tasks (an HTTP/2 connection's driver) keep running.
pub async fn wait_for_async(limit: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("condition not met within {limit:?}")
}

/// A TCP server inside `ns` echoing every connection until its peer half-closes, for as many
/// connections as come (a thread per connection; it lives as long as the test process).
pub fn echo_forever(ns: &Netns, port: u16) {
    let l = ns
        .run(|| TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Bytes each interface of `ns` has received so far, by name (`/proc/net/dev` as seen from
/// inside the namespace).
pub fn rx_bytes_by_device(ns: &Netns) -> Vec<(String, u64)> {
    ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .expect("entering the namespace")
        .expect("reading /proc/thread-self/net/dev")
        .lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(':')?;
            let rx = rest.split_whitespace().next()?.parse().ok()?;
            Some((name.to_owned(), rx))
        })
        .collect()
}

/// The agent's arguments for the same-node shortcut on or off. Tests whose proof is what
/// crosses the wire turn it off: with it, HBONE records between two pods of one node never
/// reach a device (the shortcut has its own tests, `hbone::same_node_*`).
pub fn shortcut_args(on: bool) -> [String; 2] {
    ["--same-node-shortcut".into(), on.to_string()]
}

/// A TCP server inside `ns` that answers each connection with `peer=<ip>;` followed by
/// everything it read, for `conns` connections; returns its thread.
pub fn echo_server(ns: &Netns, port: u16, conns: usize) -> std::thread::JoinHandle<()> {
    // Dual-stack where the namespace has IPv6 (IPV6_V6ONLY is off by default on Linux).
    let l = ns
        .run(|| TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port))))
        .unwrap()
        .expect("binding the test server");
    std::thread::spawn(move || {
        for _ in 0..conns {
            let Ok((mut c, peer)) = l.accept() else {
                return;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut data = Vec::new();
            let _ = c.read_to_end(&mut data);
            let mut reply = format!("peer={};", peer.ip().to_canonical()).into_bytes();
            reply.extend_from_slice(&data);
            let _ = c.write_all(&reply);
        }
    })
}

/// A TCP connection to `dst` opened from inside `ns` (at most 3 s to connect).
pub fn connect_in(ns: &Netns, dst: SocketAddr) -> std::io::Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .map_err(std::io::Error::other)?
}

/// Connects from inside `ns` to `dst`, sends `msg`, half-closes, and returns the reply.
pub fn talk(ns: &Netns, dst: SocketAddr, msg: &[u8]) -> std::io::Result<String> {
    exchange(connect_in(ns, dst)?, msg)
}

/// On a connected socket: sends `msg`, half-closes, and returns the reply (read for up to 10 s).
pub fn exchange(mut s: TcpStream, msg: &[u8]) -> std::io::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(msg)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Access-log lines of the agent with `direction` whose destination is `dst`.
pub fn access_lines(log: &str, direction: &str, dst: SocketAddr) -> usize {
    log.lines()
        .filter(|l| l.contains("connection complete"))
        .filter(|l| l.contains(&format!("direction=\"{direction}\"")))
        .filter(|l| l.contains(&format!("dst.addr={dst} ")))
        .count()
}

/// Closes a connection with a TCP reset (SO_LINGER 0), as a crashing peer would.
pub fn abort_connection(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// A plain HTTP/1.1 request from inside `ns`; returns (status, body).
pub fn http(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = connect_in(ns, addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the metric line with `name` whose labels include every `label="value"` given.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .reduce(|a, b| a + b)
}

impl Node {
    /// SIGTERMs the agent and waits (bounded) for it to exit; returns its exit status.
    pub fn terminate_agent(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.agent.take().context("no agent running")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("the agent did not exit within {limit:?} after SIGTERM")
    }
}

/// How a connection attempt ended, told apart so that a negative check says which failure it
/// expects: a refusal at connect, a reset, an orderly close without a byte, or nothing at all.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The reply (at least one byte) read until the peer closed.
    Reply(String),
    /// `connect` was refused (RST to the SYN).
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// Closed in order before a byte arrived.
    Eof,
    /// No answer within the bound (connect 3 s, reply 10 s).
    Timeout,
    /// Any other error.
    Other(String),
}

impl Outcome {
    fn of_error(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Outcome::Refused,
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => Outcome::Reset,
            K::WouldBlock | K::TimedOut => Outcome::Timeout,
            _ => Outcome::Other(e.to_string()),
        }
    }
}

/// Connects from inside `ns` to `dst`, sends `msg`, half-closes, and reads until the peer
/// closes: what came back, or how it failed.
pub fn attempt(ns: &Netns, dst: SocketAddr, msg: &[u8]) -> Outcome {
    let mut s = match connect_in(ns, dst) {
        Ok(s) => s,
        Err(e) => return Outcome::of_error(&e),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    // A reset can already be waiting; the read below reports it.
    let _ = s
        .write_all(msg)
        .and_then(|_| s.shutdown(std::net::Shutdown::Write));
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) if out.is_empty() => Outcome::Eof,
        Ok(_) => Outcome::Reply(String::from_utf8_lossy(&out).into_owned()),
        Err(e) => Outcome::of_error(&e),
    }
}

/// A TCP server inside `ns` that answers each connection, on its first read, with
/// `<name>;peer=<ip>;` and then echoes what it reads until its peer half-closes; at most 400
/// connections (a thread each), until the test process ends.
pub fn echo_named(ns: &Netns, port: u16, name: &str) {
    let l = ns
        .run(|| TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port))))
        .unwrap()
        .expect("binding the test server");
    let name = name.to_owned();
    std::thread::spawn(move || {
        for _ in 0..400 {
            let Ok((mut c, peer)) = l.accept() else {
                return;
            };
            let name = name.clone();
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 16384];
                let mut first = true;
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut out = Vec::new();
                            if first {
                                let who = format!("{name};peer={};", peer.ip().to_canonical());
                                out.extend_from_slice(who.as_bytes());
                                first = false;
                            }
                            out.extend_from_slice(&buf[..n]);
                            if c.write_all(&out).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

impl Node {
    /// The agent's readiness answer (status, body) on its default address.
    pub fn readiness(&self) -> (u16, String) {
        http(
            &self.ns.open(),
            SocketAddr::from(([127, 0, 0, 1], 15021)),
            "GET",
            "/healthz/ready",
        )
        .unwrap_or_else(|e| panic!("GET /healthz/ready: {e}"))
    }

    /// Waits (at most `limit`) until the agent answers ready (200) on its default address.
    pub fn wait_ready(&self, limit: Duration) -> Result<Duration> {
        let (ns, ready) = (self.ns.open(), SocketAddr::from(([127, 0, 0, 1], 15021)));
        wait_for(limit, || {
            http(&ns, ready, "GET", "/healthz/ready").is_ok_and(|(status, _)| status == 200)
        })
    }

    /// Replaces the running agent (SIGKILL, as a crash) by `binary` (`None`: the one built)
    /// and waits until the new one is ready, its captured pods re-adopted.
    pub fn restart_agent(&mut self, binary: Option<PathBuf>) -> Result<()> {
        self.kill_agent();
        self.agent_binary = binary;
        self.start_agent()?;
        self.wait_ready(Duration::from_secs(30))
            .context("the restarted agent did not become ready")?;
        Ok(())
    }

    /// GET `path` from one of the agent's HTTP endpoints (`port` on the node's loopback:
    /// 15020 metrics, 15021 readiness, 15000 admin); the body, which must come with 200.
    pub fn scrape(&self, path: &str, port: u16) -> String {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (status, body) = http(&self.ns.open(), addr, "GET", path)
            .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
        assert_eq!(status, 200, "GET {path} on {addr}: {body}");
        body
    }
}

/// `promtool check metrics` (Debian package `prometheus`) on an exposition the agent served:
/// every metric has HELP, names and types follow Prometheus' rules. Panics with promtool's
/// findings.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An agent's log file, read once it has not grown for 30 ms (or after 2 s of steady
/// growth): the agent's data-path threads write their lines in batches when they run out of
/// work, from microseconds to ~0.1 s after the connections they describe ended
/// (docs/operations.md, "Access log"), so a client that has just seen its connection end can
/// be ahead of the line about it.
pub fn settled_log(path: &Path) -> String {
    let len = || std::fs::metadata(path).map(|m| m.len()).ok();
    let mut last = len();
    let mut quiet = 0;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(10));
        let now = len();
        if now == last {
            quiet += 1;
            if quiet == 3 {
                break;
            }
        } else {
            quiet = 0;
            last = now;
        }
    }
    std::fs::read_to_string(path).unwrap_or_default()
}
