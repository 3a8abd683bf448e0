//! Mesh fixtures: a CA the test controls, Pod manifests for the agents' workload store, a
//! veth "wire" between two nodes, packet captures, and a raw HBONE client for refusals.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::{Node, Pod, run_ok, unique, wait_for};

/// A node whose agent runs on a test CA (`mesh_args`, trust domain `td`) with `extra`
/// arguments, and one captured pod `b` whose manifest the agent has loaded: where the tests
/// that probe a pod's 15008 themselves start.
pub struct MeshPod {
    // Dropped in this order: the pod, the node (its agent), the CA, the manifests.
    pub b: Pod,
    pub node: Node,
    pub ca: TestCa,
    pub shared: crate::TempDir,
}

impl MeshPod {
    pub fn start(tag: &str, td: &str, extra: &[&str]) -> Self {
        let ca = TestCa::new(tag);
        let shared = crate::TempDir::new(tag);
        let mut node = Node::new("1.0.0").unwrap();
        node.agent_args = mesh_args(&ca, &shared.0, td);
        node.agent_args.extend(extra.iter().map(|a| a.to_string()));
        node.start_agent().unwrap();
        let b = node.add_pod("b").unwrap();
        write_pod_manifest(&shared.0.join("manifests"), &b, "b", true);
        wait_manifest_pods(&node, 1);
        Self {
            b,
            node,
            ca,
            shared,
        }
    }
}

/// A CA of the test's own: agents load it as their plug-in CA, and the test can mint any
/// certificate it needs (foreign trust domain, expired...).
pub struct TestCa {
    pub cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and key in PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("test root {name}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        let key_pem = key.serialize_pem();
        Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(p, key),
        }
    }

    /// Writes ca-cert.pem / ca-key.pem into `dir` and returns the agent arguments using them.
    pub fn agent_args(&self, dir: &Path) -> Vec<String> {
        std::fs::create_dir_all(dir).unwrap();
        let (c, k) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        vec![
            "--ca-cert".into(),
            c.display().to_string(),
            "--ca-key".into(),
            k.display().to_string(),
        ]
    }

    /// A workload certificate for `uri`, valid over [not_before, not_after].
    pub fn leaf(&self, uri: &str, not_before: SystemTime, not_after: SystemTime) -> Leaf {
        self.leaf_with_uris(&[uri], not_before, not_after)
    }

    /// A certificate with every one of `uris` as a URI SAN (an X.509-SVID has exactly one).
    pub fn leaf_with_uris(
        &self,
        uris: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Leaf {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A certificate for `uri` valid for the next hour.
    pub fn valid_leaf(&self, uri: &str) -> Leaf {
        let now = SystemTime::now();
        self.leaf(
            uri,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
    }
}

/// Writes a Pod manifest for `pod` into `dir` (as the Kubernetes API would describe it).
pub fn write_pod_manifest(dir: &Path, pod: &Pod, service_account: &str, captured: bool) {
    write_manifest(
        dir,
        &pod.namespace,
        &pod.name,
        &pod.ips,
        service_account,
        captured,
    );
}

/// Writes a Pod manifest with explicit fields (for pods that are not what they claim).
pub fn write_manifest(
    dir: &Path,
    namespace: &str,
    name: &str,
    ips: &[IpAddr],
    service_account: &str,
    captured: bool,
) {
    let annotations = if captured {
        serde_json::json!({"ambit.dev/redirection": "enabled"})
    } else {
        serde_json::json!({})
    };
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name},
                     "annotations": annotations},
        "spec": {"serviceAccountName": service_account, "containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running",
                   "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
    });
    write_json(dir, &format!("{namespace}-{name}.json"), &pod);
}

/// Writes `value` as `dir/file` atomically (the agent never reads half a file).
pub fn write_json(dir: &Path, file: &str, value: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join(file);
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    std::fs::rename(tmp, file).unwrap();
}

/// A pair of Service VIPs (IPv4, IPv6) unique in this run: `10.96.<pid>.<n>` and
/// `fd00:96:<pid>::<n>`. They exist only inside the test's own namespaces.
pub fn vips() -> (IpAddr, IpAddr) {
    static N: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let p = (std::process::id() % 250) as u8;
    (
        IpAddr::from([10, 96, p, n]),
        IpAddr::from([0xfd00, 0x96, u16::from(p), 0, 0, 0, 0, u16::from(n)]),
    )
}

/// Writes a Service manifest `<namespace>-svc-<name>.json`: `ports` are (name, port,
/// targetPort) with the targetPort as written in YAML (a number or a port name); `spec` is
/// merged into the spec (e.g. `internalTrafficPolicy`).
pub fn write_service(
    dir: &Path,
    namespace: &str,
    name: &str,
    vips: &[IpAddr],
    ports: &[(&str, u16, &str)],
    spec: serde_json::Value,
) {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(n, p, t)| {
            let target = t
                .parse::<u16>()
                .map_or_else(|_| serde_json::json!(t), |t| serde_json::json!(t));
            serde_json::json!({"name": n, "port": p, "protocol": "TCP", "targetPort": target})
        })
        .collect();
    let vips: Vec<String> = vips.iter().map(ToString::to_string).collect();
    let mut svc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "ClusterIP", "clusterIP": vips.first().cloned().unwrap_or_default(),
                 "clusterIPs": vips, "selector": {"app": name}, "ports": ports},
    });
    if let (Some(s), Some(extra)) = (svc["spec"].as_object_mut(), spec.as_object()) {
        s.extend(extra.clone());
    }
    write_json(dir, &format!("{namespace}-svc-{name}.json"), &svc);
}

/// Writes an EndpointSlice `<namespace>-eps-<slice>.json` of `service` with `ports`
/// (name, target port) and ready `endpoints` (all of one family; `ipv6` says which when
/// there are none), as the EndpointSlice controller would.
pub fn write_endpoint_slice(
    dir: &Path,
    namespace: &str,
    slice: &str,
    service: &str,
    ipv6: bool,
    ports: &[(&str, u16)],
    endpoints: &[IpAddr],
) {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|ip| {
            serde_json::json!({"addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    let value = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": slice, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": if ipv6 { "IPv6" } else { "IPv4" },
        "ports": ports,
        "endpoints": endpoints,
    });
    write_json(dir, &format!("{namespace}-eps-{slice}.json"), &value);
}

/// A Service `default/<name>` at `vip` with one TCP port `port` (named `http`) to `target`,
/// and one EndpointSlice `<name>-1` listing `endpoints` (of the VIP's family); `spec` as in
/// [`write_service`].
pub fn write_simple_service(
    dir: &Path,
    name: &str,
    vip: IpAddr,
    (port, target): (u16, u16),
    endpoints: &[IpAddr],
    spec: serde_json::Value,
) {
    let target_text = target.to_string();
    write_service(
        dir,
        "default",
        name,
        &[vip],
        &[("http", port, &target_text)],
        spec,
    );
    write_endpoint_slice(
        dir,
        "default",
        &format!("{name}-1"),
        name,
        vip.is_ipv6(),
        &[("http", target)],
        endpoints,
    );
}

/// The mission's AuthorizationPolicy, verbatim: only productpage may reach ratings.
pub const RATINGS_VIEWER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-viewer
  namespace: default
spec:
  selector: # where to apply the policy
    matchLabels:
      app: ratings
  action: ALLOW # or DENY, AUDIT or CUSTOM
  rules:
  - from:
    - source:
        principals: # can also be namespace or ip blocks
        - cluster1/ns/default/sa/productpage
";

/// Emulates kube-proxy (nftables mode) on `node`: connections to each VIP and port are
/// DNATed, in the node's prerouting (from pods) and output (from the node itself) paths, to
/// a random one of its endpoints — so a client that Ambit does not capture reaches the
/// Service in plaintext. The VIPs are routed to the bridge, so the node's own connections
/// find a route before the DNAT.
pub fn kube_proxy(node: &Node, services: &[(SocketAddr, Vec<SocketAddr>)]) -> Result<()> {
    let mut rules = String::new();
    for (vip, endpoints) in services {
        anyhow::ensure!(!endpoints.is_empty(), "{vip}: no endpoint to DNAT to");
        let (fam, daddr) = if vip.is_ipv4() {
            ("ip", "ip daddr")
        } else {
            ("ip6", "ip6 daddr")
        };
        let map: Vec<String> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i} : {} . {}", e.ip(), e.port()))
            .collect();
        rules.push_str(&format!(
            "    {daddr} {} tcp dport {} dnat {fam} to numgen random mod {} map {{ {} }}\n",
            vip.ip(),
            vip.port(),
            endpoints.len(),
            map.join(", ")
        ));
    }
    let table = unique("kp");
    let text = format!(
        "table inet {table} {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n  chain out {{\n    type nat hook output priority -100; policy accept;\n{rules}  }}\n}}\n"
    );
    let file = node.dir.0.join(format!("{table}.nft"));
    std::fs::write(&file, text)?;
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", &node.ns.name, "nft", "-f"])
            .arg(&file),
    )?;
    let mut routed = std::collections::HashSet::new();
    for (vip, _) in services {
        if routed.insert(vip.ip()) {
            let host = if vip.is_ipv4() { "/32" } else { "/128" };
            run_ok(Command::new("ip").args([
                "-n",
                &node.ns.name,
                "route",
                "add",
                &format!("{}{host}", vip.ip()),
                "dev",
                &node.bridge,
            ]))?;
        }
    }
    Ok(())
}

/// How many manifest snapshots the node's agent has loaded so far.
/// Waits until the agent has loaded a manifests snapshot holding `pods` Pod objects.
pub fn wait_manifest_pods(node: &Node, pods: usize) {
    crate::wait_for(std::time::Duration::from_secs(10), || {
        node.agent_log().contains(&format!("pods={pods} "))
    })
    .unwrap_or_else(|_| {
        panic!(
            "{pods} pods not loaded from manifests:\n{}",
            node.agent_log()
        )
    });
}

pub fn manifest_loads(node: &Node) -> usize {
    node.agent_log().matches("manifests loaded").count()
}

/// Writes `text` as `dir/file` (atomically) and waits until the agent has loaded a snapshot
/// containing it (one more "manifests loaded" than before).
pub fn apply_manifest(node: &Node, dir: &Path, file: &str, text: &str) {
    let before = manifest_loads(node);
    let tmp = dir.join(format!("{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
    wait_for(Duration::from_secs(10), || manifest_loads(node) > before)
        .unwrap_or_else(|_| panic!("{file} not loaded:\n{}", node.agent_log()));
}

/// A veth pair joining two node namespaces, with routes to each other's pod subnets.
pub fn link_nodes(a: &Node, b: &Node) -> Result<String> {
    let (ea, eb) = (unique("aw"), unique("aw"));
    let ip = |args: &[&str]| run_ok(Command::new("ip").args(args));
    ip(&[
        "-n", &a.ns.name, "link", "add", &ea, "type", "veth", "peer", "name", &eb, "netns",
        &b.ns.name,
    ])?;
    for (ns, dev, v4, v6) in [
        (&a.ns.name, &ea, "192.0.2.1/30", "2001:db8::1/64"),
        (&b.ns.name, &eb, "192.0.2.2/30", "2001:db8::2/64"),
    ] {
        ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
        ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    for (from, to, via4, via6) in [
        (a, b, "192.0.2.2", "2001:db8::2"),
        (b, a, "192.0.2.1", "2001:db8::1"),
    ] {
        ip(&["-n", &from.ns.name, "route", "add", &to.subnet, "via", via4])?;
        if let Some(s6) = &to.subnet6 {
            ip(&["-n", &from.ns.name, "-6", "route", "add", s6, "via", via6])?;
        }
    }
    Ok(ea)
}

/// Packet captures prove an absence, so they must drop nothing, and tcpdump falls behind when
/// other tests of the same binary load both CPUs. A test that captures holds this lock
/// exclusively ([`capture_alone`]); the other tests of its binary hold it shared
/// ([`beside_captures`]), so they still run in parallel with each other, never with a capture.
static CAPTURE_LOCK: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub fn capture_alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    CAPTURE_LOCK.write().unwrap_or_else(|p| p.into_inner())
}

pub fn beside_captures() -> std::sync::RwLockReadGuard<'static, ()> {
    CAPTURE_LOCK.read().unwrap_or_else(|p| p.into_inner())
}

/// tcpdump on every interface of a namespace (`-i any`), stopped and read on [`Capture::finish`].
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
    err: PathBuf,
}

impl Capture {
    pub fn start(netns: &str, dir: &Path) -> Result<Self> {
        let file = dir.join(format!("{}.pcap", unique("cap")));
        let err = dir.join(format!("{}.err", unique("cap")));
        let child = Command::new("ip")
            // A 256 MiB buffer: a proof of absence needs a capture that dropped nothing, and
            // `-i any` with full snap length keeps each (offloaded, up to 64 KiB) frame once per
            // interface it crosses; 64 MiB was seen to drop 161 of 3,550 frames on a busy
            // 2-vCPU machine while tcpdump was not scheduled.
            // Immediate mode: packets reach the file as they come, not in blocks that a stop
            // could leave unwritten.
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-i",
                "any",
                "-nn",
                "-U",
                "--immediate-mode",
                "-s",
                "0",
                "-B",
                "262144",
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .context("starting tcpdump (package tcpdump)")?;
        let cap = Self {
            child: Some(child),
            file,
            err: err.clone(),
        };
        wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&err).is_ok_and(|s| s.contains("listening on"))
        })
        .context("tcpdump did not start")?;
        Ok(cap)
    }

    /// Stops the capture and returns the file's bytes; fails if the kernel dropped packets.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if let Some(c) = self.child.take() {
            // SIGINT lets tcpdump flush and close the file.
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let mut c = c;
            let _ = c.wait();
        }
        let report = std::fs::read_to_string(&self.err)?;
        let dropped = report
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .context("tcpdump reported no drop count")?;
        anyhow::ensure!(
            dropped == 0,
            "the capture dropped {dropped} packets: {report}"
        );
        Ok(std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a raw HBONE attempt got.
#[derive(Debug, PartialEq, Eq)]
pub enum HboneOutcome {
    /// The TLS handshake (or the first read after it) failed: no stream was possible.
    Refused(String),
    /// The CONNECT was answered with this status.
    Status(u16),
}

fn pem_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ambit_proxy::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS client for probing 15008: presents `client` (or no certificate), speaks only
/// `versions` with every cipher suite rustls has (not just Ambit's), offers ALPN h2, and
/// accepts any server certificate (the probe tests the server).
pub fn probe_client_config(
    client: Option<&Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match client {
        Some(leaf) => {
            use rustls::pki_types::pem::PemObject;
            builder.with_client_auth_cert(
                pem_certs(&leaf.cert_pem),
                rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?,
            )?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// TLS 1.3 to the HBONE port `hbone` from inside `ns`, presenting `leaf`.
pub async fn tls_to(
    ns: &ambit_common::netns::Netns,
    hbone: SocketAddr,
    leaf: &Leaf,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_over(crate::connect_in(ns, hbone).unwrap(), hbone, leaf).await
}

/// [`tls_to`] over a TCP connection the caller opened (and may keep a clone of).
pub async fn tls_over(
    tcp: std::net::TcpStream,
    hbone: SocketAddr,
    leaf: &Leaf,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = Arc::new(probe_client_config(Some(leaf), &[&rustls::version::TLS13]).unwrap());
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// From inside `netns`, opens TLS to `server` presenting `client` (or no certificate), then
/// sends one CONNECT for `authority` (or another method) and reports the outcome.
pub fn hbone_attempt(
    netns: &ambit_common::netns::Netns,
    server: SocketAddr,
    client: Option<&Leaf>,
    method: &str,
    authority: &str,
) -> Result<HboneOutcome> {
    let tcp = crate::connect_in(netns, server)?;
    tcp.set_nonblocking(true)?;
    let config = probe_client_config(client, &[&rustls::version::TLS13])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (method, authority) = (method.to_owned(), authority.to_owned());
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
        let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        {
            Ok(t) => t,
            Err(e) => return Ok(HboneOutcome::Refused(e.to_string())),
        };
        // TLS 1.3: a rejected client certificate is reported after the client's handshake
        // ends, so the refusal shows on the first exchange.
        let (send, conn) = match h2::client::handshake(tls).await {
            Ok(x) => x,
            Err(e) => return Ok(HboneOutcome::Refused(e.to_string())),
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .method(method.as_str())
            .uri(if method == "CONNECT" {
                authority.clone()
            } else {
                format!("http://{authority}/")
            })
            .body(())?;
        let exchange = async { send.ready().await?.send_request(req, true)?.0.await };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok(resp)) => Ok(HboneOutcome::Status(resp.status().as_u16())),
            Ok(Err(e)) => Ok(HboneOutcome::Refused(e.to_string())),
            Err(_) => bail!("no answer to the CONNECT within 10 s"),
        }
    })
}

/// What a test HBONE server saw of the one CONNECT it served.
#[derive(Debug, Default)]
pub struct SeenConnect {
    pub method: String,
    pub authority: String,
    pub forwarded: String,
    pub baggage: String,
    /// URI SAN of the client certificate.
    pub client_identity: String,
    /// Bytes received on the stream (when answered 200).
    pub data: Vec<u8>,
    /// TCP connections accepted (2 when the first was shut down with GOAWAY).
    pub connections: usize,
}

/// A destination's HBONE endpoint played by the test: mutual TLS with `leaf` (clients must
/// chain to `ca`), one CONNECT answered with `status`; on 200 it echoes the stream's bytes
/// back after END_STREAM.
pub fn hbone_server(
    netns: &ambit_common::netns::Netns,
    leaf: &Leaf,
    ca: &TestCa,
    status: u16,
) -> std::thread::JoinHandle<Result<SeenConnect>> {
    hbone_server_with(netns, leaf, ca, status, false)
}

/// [`hbone_server`]; with `goaway_first`, the first connection is answered, after its TLS and
/// HTTP/2 handshakes, with GOAWAY (NO_ERROR, last stream 0) — what a draining agent's server
/// does — so its streams are refused unprocessed; the CONNECT is served on the next one.
pub fn hbone_server_with(
    netns: &ambit_common::netns::Netns,
    leaf: &Leaf,
    ca: &TestCa,
    status: u16,
    goaway_first: bool,
) -> std::thread::JoinHandle<Result<SeenConnect>> {
    use rustls::pki_types::pem::PemObject;
    let l = netns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 15008)))
        .unwrap()
        .unwrap();
    l.set_nonblocking(true).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_certs(&ca.cert_pem).remove(0)).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        ambit_proxy::tls::provider(),
    )
    .build()
    .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(ambit_proxy::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(&leaf.cert_pem), key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let mut connections = 0;
            if goaway_first {
                let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), l.accept())
                    .await
                    .context("no HBONE connection arrived")??;
                connections += 1;
                let mut conn = h2::server::handshake(acceptor.accept(tcp).await?).await?;
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                // Driven until the GOAWAY is out; its streams are never served. Then held
                // open, as a draining agent holds its connections: closed at once, the
                // socket would answer a CONNECT that crossed the GOAWAY with a reset, and
                // the client would see a broken pipe instead of the GOAWAY (a flaky failure).
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), async {
                        while let Some(Ok(_)) = conn.accept().await {}
                        std::future::pending::<()>().await;
                    })
                    .await;
                });
            }
            let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), l.accept())
                .await
                .context("no HBONE connection arrived")??;
            connections += 1;
            let tls = acceptor.accept(tcp).await?;
            let client_identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| ambit_proxy::tls::identities(c).into_iter().next())
                .map(|i| i.to_string())
                .unwrap_or_default();
            let mut conn = h2::server::handshake(tls).await?;
            let (req, mut respond) = conn.accept().await.context("no stream")??;
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let mut seen = SeenConnect {
                method: req.method().to_string(),
                authority: req.uri().to_string(),
                forwarded: header("forwarded"),
                baggage: header("baggage"),
                client_identity,
                data: Vec::new(),
                connections,
            };
            let resp = http::Response::builder().status(status).body(())?;
            if status != 200 {
                respond.send_response(resp, true)?;
                // Keep the connection driven until the client goes away.
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.accept()).await;
                return Ok(seen);
            }
            let mut send = respond.send_response(resp, false)?;
            let driver =
                tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
            let mut body = req.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                seen.data.extend_from_slice(&chunk);
            }
            let mut reply = b"ok:".to_vec();
            reply.extend_from_slice(&seen.data);
            send.send_data(bytes::Bytes::from(reply), true)?;
            // Let the frames leave before the connection is dropped.
            tokio::time::sleep(Duration::from_millis(200)).await;
            driver.abort();
            Ok(seen)
        })
    })
}

/// Agent arguments of a mesh test: `trust_domain`, and `manifests` (created) as the workload
/// store's source, polled every 100 ms.
/// Agent arguments for a mesh node: `ca` (kept in `shared/ca`) and the manifests directory
/// `shared/manifests` in trust domain `td`.
pub fn mesh_args(ca: &TestCa, shared: &Path, td: &str) -> Vec<String> {
    let mut v = ca.agent_args(&shared.join("ca"));
    v.extend(manifest_args(&shared.join("manifests"), td));
    v
}

pub fn manifest_args(manifests: &Path, trust_domain: &str) -> Vec<String> {
    std::fs::create_dir_all(manifests).unwrap();
    vec![
        "--trust-domain".into(),
        trust_domain.into(),
        "--manifests-poll-seconds".into(),
        "0.1".into(),
        "--manifests-dir".into(),
        manifests.display().to_string(),
    ]
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Everything a capture must show: TCP only to or from 15008, TLS records only, never the
/// marker. Returns the TCP payload bytes seen (each segment once, whatever the interface).
pub fn assert_only_tls(where_: &str, capture: &[u8], marker: &[u8]) -> usize {
    assert!(
        !contains(capture, marker),
        "{where_}: the plaintext marker is on the wire"
    );
    let segments = crate::pcap::tcp_segments(capture).unwrap();
    assert!(!segments.is_empty(), "{where_}: nothing captured");
    let stray: Vec<_> = segments
        .iter()
        .filter(|s| s.src.port() != 15008 && s.dst.port() != 15008)
        .map(|s| format!("{} -> {}", s.src, s.dst))
        .collect();
    assert!(
        stray.is_empty(),
        "{where_}: TCP outside HBONE: {:?}",
        &stray[..stray.len().min(5)]
    );
    let mut bytes = 0;
    for ((src, dst), data) in crate::pcap::streams(&segments) {
        let (records, _) = crate::pcap::tls_records(&data)
            .unwrap_or_else(|e| panic!("{where_}: {src} -> {dst} is not TLS: {e}"));
        assert!(
            records > 0,
            "{where_}: {src} -> {dst} carried no TLS record"
        );
        bytes += data.len();
    }
    bytes
}
