//! ambit-demo: Ambit doing its job on one machine, with real output.
//!
//! A node (a network namespace with the real CNI chain bridge + host-local + ambit-cni and a
//! running ambit-agent with its embedded CA), three pods of namespace `default` created through
//! libcni — productpage, reviews, ratings — with the Services `reviews` and `ratings` (a
//! ClusterIP each, and a kube-proxy-like DNAT on the node, as a cluster has), and then:
//! 1. productpage → reviews and reviews → ratings, called **by Service** as Bookinfo calls
//!    them, work through HBONE to the endpoint pods (access log lines naming the Service);
//! 2. a packet capture on the node side of the pods sees only TLS to 15008, never the marker
//!    the client sent;
//! 3. a `ratings-viewer` AuthorizationPolicy (Istio's L4 example) lets productpage in and refuses
//!    reviews, both calling the `ratings` Service;
//! 4. the metrics endpoint counts those connections.
//!
//! Run through `scripts/demo.sh` (installs, builds, cleans up on exit or Ctrl-C).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_tests::mesh::{Capture, kube_proxy, vips, write_pod_manifest, write_simple_service};
use ambit_tests::{Node, TempDir, http, metric, require_root, talk, wait_for};
use anyhow::{Context, Result, ensure};

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster1/ns/default/sa/productpage
";

fn step(n: u32, title: &str) {
    println!("\n=== {n}. {title}");
}

fn access_lines(log: &str, since: usize) -> Vec<String> {
    log.lines()
        .skip(since)
        .filter(|l| l.contains(" access: ") || l.contains(" authz: "))
        .map(|l| {
            // Drop the timestamp and level for readability.
            l.split_once(" access: ")
                .or_else(|| l.split_once(" authz: "))
                .map(|(_, r)| format!("  {r}"))
                .unwrap_or_else(|| l.to_owned())
        })
        .collect()
}

/// A Bookinfo "app": answers every connection with `answer` and what it read.
fn app(ns: &ambit_common::netns::Netns, port: u16, answer: &'static str) -> Result<()> {
    use std::io::{Read, Write};
    let l = ns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", port)))
        .map_err(anyhow::Error::msg)??;
    std::thread::spawn(move || {
        // Bounded: the demo makes a handful of connections.
        for _ in 0..64 {
            let Ok((mut c, peer)) = l.accept() else {
                return;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got);
            let _ = write!(
                c,
                "{answer} (app saw client {}, {} bytes)",
                peer.ip(),
                got.len()
            );
        }
    });
    Ok(())
}

fn main() -> Result<()> {
    require_root();
    let started = Instant::now();
    let dir = TempDir::new("demo");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let mut node = Node::new("1.0.0")?;
    node.agent_args = [
        "--trust-domain",
        "cluster1",
        "--manifests-dir",
        manifests.to_str().context("path")?,
        "--manifests-poll-seconds",
        "0.2",
        "--drain-timeout",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    node.start_agent()
        .with_context(|| format!("agent log:\n{}", node.agent_log()))?;
    println!(
        "Node namespace {} with bridge {} ({}), CNI chain bridge + host-local + ambit-cni; ambit-agent running (embedded CA, trust domain cluster1).",
        node.ns.name, node.bridge, node.subnet
    );
    let productpage = node.add_pod("productpage")?;
    let reviews = node.add_pod("reviews")?;
    let ratings = node.add_pod("ratings")?;
    for (p, sa) in [
        (&productpage, "productpage"),
        (&reviews, "reviews"),
        (&ratings, "ratings"),
    ] {
        write_pod_manifest(&manifests, p, sa, true);
        println!(
            "  pod {:<12} {:<15} added through libcni in {:>3} ms, identity spiffe://cluster1/ns/default/sa/{sa}",
            p.name,
            p.ip,
            p.add_time.as_millis()
        );
    }
    wait_for(Duration::from_secs(10), || {
        node.agent_log().contains("pods=3 ")
    })
    .context("the agent did not load the Pod manifests")?;
    // The Services, as the API server and kube-proxy would have them: a ClusterIP each, an
    // EndpointSlice naming the pod, and the node's DNAT of ClusterIP:9080 to the pod.
    let mut services = Vec::new();
    for pod in [&reviews, &ratings] {
        let (vip, _) = vips();
        write_simple_service(
            &manifests,
            &pod.name,
            vip,
            (9080, 9080),
            &[pod.ip],
            serde_json::json!({}),
        );
        let svc = SocketAddr::new(vip, 9080);
        println!(
            "  Service {:<7} ClusterIP {svc} → endpoint {}:9080 (kube-proxy-like DNAT on the node)",
            pod.name, pod.ip
        );
        services.push((svc, vec![SocketAddr::new(pod.ip, 9080)]));
    }
    kube_proxy(&node, &services)?;
    wait_for(Duration::from_secs(10), || {
        node.agent_log().contains("endpoint_slices=2 ")
    })
    .context("the agent did not load the Services")?;
    let (reviews_svc, dst) = (services[0].0, services[1].0);
    app(&reviews.ns.open(), 9080, "reviews: 2 reviews")?;
    app(&ratings.ns.open(), 9080, "ratings: 5 stars")?;

    // The capture runs from the first connection on, so every TLS stream is seen whole.
    let cap = Capture::start(&node.ns.name, &dir.0)?;
    step(
        1,
        "productpage → reviews:9080 and reviews → ratings:9080, by Service, through HBONE",
    );
    let mark = node.agent_log().lines().count();
    for (who, pod, to, answer) in [
        (
            "productpage → reviews",
            &productpage,
            reviews_svc,
            "reviews",
        ),
        ("reviews → ratings", &reviews, dst, "ratings"),
    ] {
        let r = talk(&pod.ns.open(), to, b"GET /")?;
        println!("  {who} ({to}) got: {r}");
        ensure!(r.starts_with(answer), "{who} did not get through");
    }
    std::thread::sleep(Duration::from_millis(200));
    println!("  agent access log (one line per side of each connection):");
    for l in access_lines(&node.agent_log(), mark) {
        println!("{l}");
    }

    step(
        2,
        "what the wire sees: tcpdump on every interface of the node (bridge, pod veths)",
    );
    let marker = format!("SECRET-MARKER-{}", std::process::id());
    let msg = marker.repeat(2000);
    let r = talk(&productpage.ns.open(), dst, msg.as_bytes())?;
    println!(
        "  productpage sent {} bytes containing {marker:?}; ratings answered: {r}",
        msg.len()
    );
    let pcap = cap.finish()?;
    let segs = ambit_tests::pcap::tcp_segments(&pcap)?;
    let on_15008 = segs
        .iter()
        .filter(|s| s.src.port() == 15008 || s.dst.port() == 15008)
        .count();
    let found = pcap.windows(marker.len()).any(|w| w == marker.as_bytes());
    // Read inside the node's namespace, so interface names are the node's.
    let out = Command::new("ip")
        .args(["netns", "exec", &node.ns.name, "tcpdump", "-r"])
        .arg(cap_path(&dir.0)?)
        .args(["-nn", "-c", "8", "tcp"])
        .output();
    if let Ok(o) = out {
        println!("  first packets (tcpdump -r):");
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            println!("    {l}");
        }
    }
    println!(
        "  {} TCP segments captured, {on_15008} of them to/from port 15008 (HBONE), {} on any other port",
        segs.len(),
        segs.len() - on_15008
    );
    let tls_ok = ambit_tests::pcap::streams(&segs)
        .values()
        .all(|data| ambit_tests::pcap::tls_records(data).is_ok());
    println!("  every captured byte stream parses as TLS records: {tls_ok}");
    println!("  the marker appears in the capture: {found}");
    ensure!(
        !found && tls_ok && on_15008 == segs.len() && !segs.is_empty(),
        "plaintext on the wire"
    );

    step(3, "apply the ratings-viewer AuthorizationPolicy");
    println!(
        "{}",
        POLICY
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mark = node.agent_log().lines().count();
    std::fs::write(manifests.join("ratings-viewer.yaml"), POLICY)?;
    wait_for(Duration::from_secs(10), || {
        node.agent_log().contains("policy=default/ratings-viewer")
    })?;
    let pp = talk(&productpage.ns.open(), dst, b"GET /ratings/0");
    let rv = talk(&reviews.ns.open(), dst, b"GET /ratings/0");
    println!("  productpage → ratings (Service {dst}): {pp:?}");
    println!(
        "  reviews → ratings (Service {dst}):     {rv:?} (refused with 401 at ratings: the app's connection is reset)"
    );
    ensure!(
        pp.as_deref().is_ok_and(|r| r.starts_with("ratings")),
        "productpage refused"
    );
    ensure!(rv.as_deref().unwrap_or("").is_empty(), "reviews was let in");
    std::thread::sleep(Duration::from_millis(200));
    for l in access_lines(&node.agent_log(), mark) {
        println!("{l}");
    }

    step(4, "the metrics endpoint (:15020/metrics)");
    let (_, text) = http(
        &node.ns.open(),
        "127.0.0.1:15020".parse()?,
        "GET",
        "/metrics",
    )?;
    for l in text.lines().filter(|l| {
        (l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\""))
            || l.starts_with("ambit_authz_decisions_total")
            || l.starts_with("ambit_pods_captured")
    }) {
        // Show the labels that matter; the full set is in docs/operations.md.
        let short: Vec<&str> = l
            .split(',')
            .filter(|kv| {
                [
                    "{reporter",
                    "source_workload=",
                    "destination_workload=",
                    "destination_service=",
                    "response_flags",
                    "connection_security_policy",
                ]
                .iter()
                .any(|k| kv.contains(k))
                    || !kv.contains('=')
            })
            .collect();
        println!(
            "  {}",
            if l.contains('{') && l.contains("reporter") {
                short.join(",")
            } else {
                l.to_owned()
            }
        );
    }
    let denied = metric(
        &text,
        "ambit_authz_decisions_total",
        &[("decision", "deny")],
    )
    .unwrap_or(0.0);
    ensure!(denied >= 1.0, "the denial was not counted");

    println!(
        "\nDone in {:.1} s. Everything (namespaces, bridge, agent, files) is removed now.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The one capture file of the demo directory.
fn cap_path(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "pcap"))
        .context("no capture file")
}
