//! Tier "services": connections addressed to a Kubernetes Service VIP (ClusterIP). The test
//! node emulates kube-proxy (DNAT of VIP:port to an endpoint in the node's namespace), so a
//! client Ambit does not capture reaches the Service in plaintext; a captured client's agent
//! resolves the VIP itself and the connection crosses the node only as HBONE to the chosen
//! endpoint pod — same node and across nodes, IPv4 and IPv6, named target ports, several
//! ports — with the destination's policy applied as for a call to the pod IP.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ambit_tests::mesh::*;
use ambit_tests::*;

const TD: &str = "cluster1";

fn args(ca: Option<&TestCa>, shared: &Path, node_name: &str) -> Vec<String> {
    let mut v = ca
        .map(|ca| ca.agent_args(&shared.join("ca")))
        .unwrap_or_default();
    v.extend(manifest_args(&shared.join("manifests"), TD));
    v.extend(["--node-name".into(), node_name.into()]);
    v
}

/// A single node with its agent, fed by a fresh manifests directory.
fn one_node() -> (TempDir, Node) {
    let shared = TempDir::new("svc");
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = args(None, &shared.0, "node-1");
    node.start_agent().unwrap();
    (shared, node)
}

/// Waits until the node's agent has loaded `n` EndpointSlices (and pods and Services before
/// them, which are written first).
fn wait_slices(node: &Node, n: usize) {
    wait_for(Duration::from_secs(10), || {
        node.agent_log().contains(&format!("endpoint_slices={n} "))
    })
    .unwrap_or_else(|_| panic!("slices not loaded:\n{}", node.agent_log()));
}

/// The server name an [`echo_named`] reply starts with, and the peer address it saw.
fn served_by(reply: &str) -> (String, String) {
    let mut parts = reply.splitn(3, ';');
    let name = parts.next().unwrap_or_default().to_owned();
    let peer = parts
        .next()
        .and_then(|p| p.strip_prefix("peer="))
        .unwrap_or_default()
        .to_owned();
    (name, peer)
}

/// Calls `vip` from `from` until every one of `want` has served a call (at most 60 calls);
/// each reply must echo `msg` whole and come from one of `want`. Returns the calls made.
fn calls_reach(from: &Pod, vip: SocketAddr, msg: &[u8], want: &[&str], node: &Node) -> usize {
    let mut seen = BTreeSet::new();
    for i in 1..=60 {
        let out = attempt(&from.ns.open(), vip, msg);
        let Outcome::Reply(reply) = out else {
            panic!("call {i} to {vip}: {out:?}\n{}", node.agent_log());
        };
        let (name, peer) = served_by(&reply);
        assert!(
            want.contains(&name.as_str()),
            "{vip} served by {name}, not one of {want:?}"
        );
        let ip: IpAddr = peer.parse().unwrap();
        assert!(
            from.ips.contains(&ip),
            "{vip}: the app saw {peer}, not the client's own address"
        );
        let echoed = &reply.as_bytes()[reply.len() - msg.len().min(reply.len())..];
        assert!(
            echoed == msg,
            "{vip}: the echo from {name} differs ({} bytes back)",
            reply.len()
        );
        seen.insert(name);
        if seen.len() == want.len() {
            return i;
        }
    }
    panic!("{vip}: after 60 calls only {seen:?} of {want:?} served")
}

/// Waits (at most 10 s) until the agent's log has a line matching `f`: an access line is
/// written when the connection's last byte has been relayed, which can be after the client
/// has read it.
fn log_shows(node: &Node, what: &str, f: impl Fn(&str) -> bool) {
    wait_for(Duration::from_secs(10), || node.agent_log().lines().any(&f))
        .unwrap_or_else(|_| panic!("no log line {what}:\n{}", node.agent_log()));
}

/// Outbound access-log lines naming `service`.
fn service_lines<'a>(log: &'a str, service: &str) -> Vec<&'a str> {
    let field = format!("dst.service=\"{service}\"");
    log.lines()
        .filter(|l| l.contains("direction=\"outbound\"") && l.contains(&field))
        .collect()
}

#[test]
fn a_service_vip_crosses_one_node_and_two_only_as_tls_to_the_chosen_endpoint_pods() {
    let _alone = capture_alone();
    let ca = TestCa::new("svc");
    let shared = TempDir::new("svc");
    let manifests = shared.0.join("manifests");
    let mut n1 = Node::dual_stack("1.0.0").unwrap();
    let mut n2 = Node::dual_stack("1.0.0").unwrap();
    link_nodes(&n1, &n2).unwrap();
    n1.agent_args = args(Some(&ca), &shared.0, "node-1");
    n2.agent_args = args(Some(&ca), &shared.0, "node-2");
    // What crosses the wire is the proof here: same-node HBONE stays on it.
    for n in [&mut n1, &mut n2] {
        n.agent_args.extend(shortcut_args(false));
    }
    n1.start_agent().unwrap();
    n2.start_agent().unwrap();
    let pp = n1.add_pod("productpage").unwrap();
    let r1 = n1.add_pod("ratings-v1").unwrap();
    let r2 = n2.add_pod("ratings-v2").unwrap();
    for (p, sa) in [(&pp, "productpage"), (&r1, "ratings"), (&r2, "ratings")] {
        write_pod_manifest(&manifests, p, sa, true);
    }
    // Two ports, both with a named targetPort whose number differs between the two pods.
    let (v4, v6) = vips();
    write_service(
        &manifests,
        "default",
        "ratings",
        &[v4, v6],
        &[("http", 9080, "http"), ("admin", 9081, "admin")],
        serde_json::json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
    );
    let ports = [(&r1, 7100, 7300), (&r2, 7200, 7400)];
    for (pod, http, admin) in ports {
        for (idx, family) in [(0, "v4"), (1, "v6")] {
            write_endpoint_slice(
                &manifests,
                "default",
                &format!("ratings-{}-{family}", pod.name),
                "ratings",
                idx == 1,
                &[("http", http), ("admin", admin)],
                &[pod.ips[idx]],
            );
        }
        echo_named(&pod.ns.open(), http, &format!("{}/http", pod.name));
        echo_named(&pod.ns.open(), admin, &format!("{}/admin", pod.name));
    }
    wait_slices(&n1, 4);
    wait_slices(&n2, 4);
    let dnat: Vec<(SocketAddr, Vec<SocketAddr>)> = [(v4, 0), (v6, 1)]
        .into_iter()
        .flat_map(|(vip, idx)| {
            [(9080, 1), (9081, 2)].map(|(port, which)| {
                let eps = ports
                    .iter()
                    .map(|(p, h, a)| SocketAddr::new(p.ips[idx], if which == 1 { *h } else { *a }))
                    .collect();
                (SocketAddr::new(vip, port), eps)
            })
        })
        .collect();
    kube_proxy(&n1, &dnat).unwrap();
    kube_proxy(&n2, &dnat).unwrap();

    // Without Ambit in the way (the node itself is not captured): kube-proxy's DNAT serves
    // the VIP, in plaintext.
    for vip in [v4, v6] {
        let out = attempt(&n1.ns.open(), SocketAddr::new(vip, 9080), b"baseline");
        assert!(
            matches!(&out, Outcome::Reply(r) if r.contains("ratings-v") && r.ends_with("baseline")),
            "the emulated kube-proxy must serve {vip}: {out:?}"
        );
    }

    let cap1 = Capture::start(&n1.ns.name, &shared.0).unwrap();
    let cap2 = Capture::start(&n2.ns.name, &shared.0).unwrap();
    let marker = format!("AMBIT-SVC-MARKER-{}", unique("m"));
    let msg = marker.repeat(2000).into_bytes();
    let mut calls = 0;
    for vip in [v4, v6] {
        for (port, kind) in [(9080, "http"), (9081, "admin")] {
            let want = [
                format!("ratings-v1/{kind}"), // same node
                format!("ratings-v2/{kind}"), // the other node
            ];
            let want: Vec<&str> = want.iter().map(String::as_str).collect();
            calls += calls_reach(&pp, SocketAddr::new(vip, port), &msg, &want, &n1);
        }
    }
    let (pcap1, pcap2) = (cap1.finish().unwrap(), cap2.finish().unwrap());
    let tls1 = assert_only_tls("node 1 (bridge, veths, wire)", &pcap1, marker.as_bytes());
    let tls2 = assert_only_tls("node 2 (bridge, veths, wire)", &pcap2, marker.as_bytes());
    // Every call crossed node 1 as TLS, both ways; the cross-node ones node 2 too.
    assert!(
        tls1 >= calls * 2 * msg.len() * 9 / 10 && tls2 >= 4 * 2 * msg.len() * 9 / 10,
        "the calls did not cross the captured interfaces: {tls1} / {tls2} TLS bytes for {calls} calls"
    );

    // The access log names the Service, the VIP called and the endpoint served, over HBONE
    // with the endpoint's identity.
    let service = "ratings.default.svc.cluster.local";
    let complete = |log: &str| {
        service_lines(log, service)
            .iter()
            .filter(|l| l.contains("connection complete"))
            .count()
    };
    wait_for(Duration::from_secs(10), || {
        complete(&n1.agent_log()) >= calls
    })
    .unwrap_or_else(|_| panic!("{calls} access lines expected:\n{}", n1.agent_log()));
    let log1 = n1.agent_log();
    let lines = service_lines(&log1, service);
    let hbone: Vec<&&str> = lines
        .iter()
        .filter(|l| {
            l.contains("connection complete")
                && l.contains("protocol=\"hbone\"")
                && l.contains(&format!("dst.identity=spiffe://{TD}/ns/default/sa/ratings"))
        })
        .collect();
    assert_eq!(
        hbone.len(),
        calls,
        "one outbound HBONE line per call:\n{}",
        lines.join("\n")
    );
    for (pod, http, _) in ports {
        let to = SocketAddr::new(pod.ips[0], http);
        let via = SocketAddr::new(v4, 9080);
        assert!(
            hbone
                .iter()
                .any(|l| l.contains(&format!("dst.addr={to} "))
                    && l.contains(&format!("dst.vip={via}"))),
            "no line for {via} served by {to}:\n{}",
            lines.join("\n")
        );
    }
    // The destination names the Service too (the port is one of its endpoints).
    log_shows(&n2, "of an inbound HBONE stream naming the Service", |l| {
        l.contains("direction=\"inbound\"")
            && l.contains("protocol=\"hbone\"")
            && l.contains(&format!("dst.service=\"{service}\""))
    });

    // Metrics on both sides carry Istio's destination_service labels.
    let svc_labels = |reporter| {
        [
            ("reporter", reporter),
            ("destination_service", service),
            ("destination_service_name", "ratings"),
            ("destination_service_namespace", "default"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let m1 = n1.scrape("/metrics", 15020);
    let opened = metric(
        &m1,
        "istio_tcp_connections_opened_total",
        &svc_labels("source"),
    );
    assert_eq!(opened, Some(calls as f64), "{m1}");
    promtool_check(&m1);
    let m2 = n2.scrape("/metrics", 15020);
    promtool_check(&m2);
    assert!(
        metric(
            &m2,
            "istio_tcp_connections_opened_total",
            &svc_labels("destination")
        )
        .is_some_and(|v| v >= 4.0),
        "{m2}"
    );

    // The admin view lists the Service with both VIPs and its endpoints per port.
    let dump: serde_json::Value = serde_json::from_str(&n1.scrape("/config_dump", 15000)).unwrap();
    let svc = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "ratings")
        .unwrap_or_else(|| panic!("no ratings in {}", dump["services"]));
    assert_eq!(
        svc["vips"],
        serde_json::json!([v4.to_string(), v6.to_string()])
    );
    assert_eq!(svc["ports"][0]["port"], 9080);
    assert_eq!(svc["ports"][0]["endpoints"].as_array().unwrap().len(), 4);
    assert_eq!(dump["store"]["services"], 1);
}

#[test]
fn the_ratings_viewer_policy_holds_verbatim_when_productpage_calls_ratings_by_its_service() {
    let _shared_lock = beside_captures();
    let (shared, node) = one_node();
    let mut node = node;
    let manifests = shared.0.join("manifests");
    let pp = node.add_pod("productpage").unwrap();
    let rv = node.add_pod("reviews").unwrap();
    let ratings = node.add_pod("ratings").unwrap();
    for (p, sa) in [
        (&pp, "productpage"),
        (&rv, "reviews"),
        (&ratings, "ratings"),
    ] {
        write_pod_manifest(&manifests, p, sa, true);
    }
    let (vip, _) = vips();
    write_simple_service(
        &manifests,
        "ratings",
        vip,
        (9080, 9080),
        &[ratings.ip],
        serde_json::json!({}),
    );
    wait_slices(&node, 1);
    let svc = SocketAddr::new(vip, 9080);
    kube_proxy(&node, &[(svc, vec![SocketAddr::new(ratings.ip, 9080)])]).unwrap();
    echo_named(&ratings.ns.open(), 9080, "ratings");
    let reaches = |from: &Pod| {
        matches!(attempt(&from.ns.open(), svc, b"ping"),
            Outcome::Reply(r) if r.starts_with("ratings;") && r.ends_with(";ping"))
    };
    // No policy: both reach ratings through the Service.
    assert!(reaches(&pp) && reaches(&rv), "{}", node.agent_log());

    apply_manifest(&node, &manifests, "ratings-viewer.yaml", RATINGS_VIEWER);
    assert!(
        reaches(&pp),
        "productpage must reach ratings by its Service"
    );
    // reviews: the destination answers 401 before the app sees a byte, and the app's
    // connection is reset.
    assert_eq!(attempt(&rv.ns.open(), svc, b"ping"), Outcome::Reset);
    let log = node.agent_log();
    let src = format!("src.identity=spiffe://{TD}/ns/default/sa/reviews");
    assert!(
        log.lines().any(|l| l.contains("connection denied")
            && l.contains(&src)
            && l.contains(&format!("dst.ip={} dst.port=9080", ratings.ip))
            && l.contains("allow policies exist, but none allowed")),
        "{log}"
    );
    assert!(
        service_lines(&log, "ratings.default.svc.cluster.local")
            .iter()
            .any(|l| l.contains("connection failed")
                && l.contains(&src)
                && l.contains("answered CONNECT with 401")),
        "the refusal is a 401 at the destination:\n{log}"
    );

    // A DENY by principal cannot be bypassed by calling the Service name.
    std::fs::remove_file(manifests.join("ratings-viewer.yaml")).unwrap();
    wait_for(Duration::from_secs(10), || reaches(&rv)).unwrap();
    apply_manifest(
        &node,
        &manifests,
        "deny-reviews.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-reviews\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster1/ns/default/sa/reviews]\n",
    );
    assert_eq!(attempt(&rv.ns.open(), svc, b"ping"), Outcome::Reset);
    assert_eq!(
        attempt(&rv.ns.open(), SocketAddr::new(ratings.ip, 9080), b"ping"),
        Outcome::Reset
    );
    assert!(reaches(&pp), "productpage is not denied");
    assert!(
        node.agent_log()
            .contains("explicitly denied by default/deny-reviews"),
        "{}",
        node.agent_log()
    );
}

/// Writes the `pool` Service's one EndpointSlice with `endpoints` and waits until the agent
/// has loaded it.
fn scale(node: &Node, manifests: &Path, endpoints: &[&Pod]) {
    let before = manifest_loads(node);
    let ips: Vec<IpAddr> = endpoints.iter().map(|p| p.ip).collect();
    write_endpoint_slice(
        manifests,
        "default",
        "pool-1",
        "pool",
        false,
        &[("web", 8080)],
        &ips,
    );
    wait_for(Duration::from_secs(10), || manifest_loads(node) > before)
        .unwrap_or_else(|_| panic!("slice not reloaded:\n{}", node.agent_log()));
}

#[test]
fn new_connections_follow_endpoints_scaled_3_2_0_2_and_an_open_one_survives_other_changes() {
    let _shared_lock = beside_captures();
    let (shared, mut node) = one_node();
    let manifests = shared.0.join("manifests");
    let client = node.add_pod("client").unwrap();
    let pods: Vec<Pod> = ["srv-a", "srv-b", "srv-c", "srv-d"]
        .iter()
        .map(|n| node.add_pod(n).unwrap())
        .collect();
    write_pod_manifest(&manifests, &client, "client", true);
    for p in &pods {
        write_pod_manifest(&manifests, p, "srv", true);
        echo_named(&p.ns.open(), 8080, &p.name);
    }
    let (vip, _) = vips();
    let svc = SocketAddr::new(vip, 80);
    write_service(
        &manifests,
        "default",
        "pool",
        &[vip],
        &[("web", 80, "web")],
        serde_json::json!({}),
    );
    let [a, b, c, d] = [&pods[0], &pods[1], &pods[2], &pods[3]];
    scale(&node, &manifests, &[a, b, c]);
    wait_slices(&node, 1);
    calls_reach(&client, svc, b"x", &["srv-a", "srv-b", "srv-c"], &node);

    // A long-lived connection to one of them.
    let mut held = connect_in(&client.ns.open(), svc).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"hello").unwrap();
    let mut buf = [0u8; 256];
    let n = held.read(&mut buf).unwrap();
    let (holder, _) = served_by(&String::from_utf8_lossy(&buf[..n]));
    let others: Vec<&Pod> = [a, b, c].into_iter().filter(|p| p.name != holder).collect();

    // 3 -> 2: one endpoint that is not the held connection's goes.
    let gone = others[0];
    let kept: Vec<&Pod> = [a, b, c]
        .into_iter()
        .filter(|p| p.name != gone.name)
        .collect();
    scale(&node, &manifests, &kept);
    let left: Vec<&str> = kept.iter().map(|p| p.name.as_str()).collect();
    for _ in 0..30 {
        let Outcome::Reply(r) = attempt(&client.ns.open(), svc, b"x") else {
            panic!("a call failed after 3 -> 2:\n{}", node.agent_log());
        };
        let (name, _) = served_by(&r);
        assert!(
            left.contains(&name.as_str()),
            "{name} was removed but still served a new connection"
        );
    }
    held.write_all(b"again").unwrap();
    let n = held.read(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"again",
        "the open connection was cut by an unrelated endpoint change"
    );

    // 2 -> 0: new connections are reset at once, and the access log says why.
    scale(&node, &manifests, &[]);
    for _ in 0..5 {
        assert_eq!(attempt(&client.ns.open(), svc, b"x"), Outcome::Reset);
    }
    let log = node.agent_log();
    assert!(
        service_lines(&log, "pool.default.svc.cluster.local")
            .iter()
            .any(|l| l.contains("connection failed")
                && l.contains(
                    "no ready endpoint for Service pool.default.svc.cluster.local port 80"
                )),
        "{log}"
    );

    // 0 -> 2, a new set: only the new endpoints serve.
    scale(&node, &manifests, &[c, d]);
    calls_reach(&client, svc, b"x", &["srv-c", "srv-d"], &node);
}

#[test]
fn endpoints_outside_the_mesh_get_plaintext_and_a_service_without_endpoints_is_reset() {
    let _shared_lock = beside_captures();
    let (shared, mut node) = one_node();
    let manifests = shared.0.join("manifests");
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    write_pod_manifest(&manifests, &client, "client", true);
    write_pod_manifest(&manifests, &server, "server", true);
    echo_named(&server.ns.open(), 7100, "server");
    // A selector-less Service whose endpoint is outside the mesh: the node itself, at the
    // bridge's address (a stand-in for an external database).
    let gateway: IpAddr = node.subnet.replace(".0/24", ".1").parse().unwrap();
    echo_named(&node.ns.open(), 7500, "outside");
    let (legacy, _) = vips();
    let (empty, _) = vips();
    let (headless_vip, _) = vips();
    write_simple_service(
        &manifests,
        "legacy",
        legacy,
        (80, 7500),
        &[gateway],
        serde_json::json!({"selector": null}),
    );
    write_simple_service(
        &manifests,
        "empty",
        empty,
        (80, 8080),
        &[],
        serde_json::json!({}),
    );
    // Headless and ExternalName Services have no VIP: nothing to resolve.
    write_simple_service(
        &manifests,
        "server",
        headless_vip,
        (7100, 7100),
        &[server.ip],
        serde_json::json!({"clusterIP": "None", "clusterIPs": ["None"]}),
    );
    write_json(
        &manifests,
        "external.json",
        &serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
    );
    wait_slices(&node, 3);
    wait_for(Duration::from_secs(10), || {
        node.agent_log().contains("services=2 ")
    })
    .unwrap_or_else(|_| panic!("Services not loaded:\n{}", node.agent_log()));

    // Outside the mesh: plaintext to the chosen endpoint, from the client's own address.
    let out = attempt(&client.ns.open(), SocketAddr::new(legacy, 80), b"q");
    assert_eq!(
        out,
        Outcome::Reply(format!("outside;peer={};q", client.ip)),
        "{}",
        node.agent_log()
    );
    log_shows(&node, "of the plaintext connection to legacy", |l| {
        l.contains("dst.service=\"legacy.default.svc.cluster.local\"")
            && l.contains("connection complete")
            && l.contains(&format!("dst.addr={gateway}:7500 "))
            && l.contains("protocol=\"tcp\"")
    });
    let m = node.scrape("/metrics", 15020);
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("destination_service_name", "legacy"),
                ("connection_security_policy", "unknown")
            ]
        ),
        Some(1.0),
        "{m}"
    );

    // No endpoint, and a port the Service does not have: reset, with the reason logged.
    assert_eq!(
        attempt(&client.ns.open(), SocketAddr::new(empty, 80), b"q"),
        Outcome::Reset
    );
    assert_eq!(
        attempt(&client.ns.open(), SocketAddr::new(empty, 81), b"q"),
        Outcome::Reset
    );
    let log = node.agent_log();
    let lines = service_lines(&log, "empty.default.svc.cluster.local");
    for why in [
        "no ready endpoint for Service empty.default.svc.cluster.local port 80",
        "Service empty.default.svc.cluster.local has no port 81",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains("connection failed") && l.contains(why)),
            "{why}:\n{log}"
        );
    }
    let m = node.scrape("/metrics", 15020);
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service_name", "empty"),
                ("response_flags", "UH")
            ]
        ),
        Some(2.0),
        "{m}"
    );

    // The headless Service's pod is called by its own address, as DNS gives it: HBONE.
    let out = attempt(&client.ns.open(), SocketAddr::new(server.ip, 7100), b"h");
    assert_eq!(out, Outcome::Reply(format!("server;peer={};h", client.ip)));
    let to = SocketAddr::new(server.ip, 7100);
    log_shows(&node, "of an outbound HBONE connection to the pod", |l| {
        l.contains("direction=\"outbound\"")
            && l.contains("protocol=\"hbone\"")
            && l.contains(&format!("dst.addr={to} "))
    });
    // The headless VIP given above was never a VIP: it goes where it was sent (nowhere).
    let dump: serde_json::Value =
        serde_json::from_str(&node.scrape("/config_dump", 15000)).unwrap();
    let names: BTreeSet<&str> = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["empty", "legacy"].into());
}

#[test]
fn with_service_cidr_an_address_in_the_range_that_is_no_known_service_is_reset_not_sent_in_clear() {
    let _shared_lock = beside_captures();
    let shared = TempDir::new("svc");
    let manifests = shared.0.join("manifests");
    let (known, _) = vips();
    let (unknown, _) = vips();
    let range = format!(
        "{}/24",
        known.to_string().rsplit_once('.').unwrap().0.to_owned() + ".0"
    );
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = args(None, &shared.0, "node-1");
    node.agent_args
        .extend(["--service-cidr".into(), range.clone()]);
    node.start_agent().unwrap();
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    write_pod_manifest(&manifests, &client, "client", true);
    write_pod_manifest(&manifests, &server, "server", true);
    echo_named(&server.ns.open(), 7100, "server");
    write_simple_service(
        &manifests,
        "server",
        known,
        (80, 7100),
        &[server.ip],
        serde_json::json!({}),
    );
    wait_slices(&node, 1);
    // kube-proxy serves both VIPs: the second is a Service the agent has not learnt (its
    // watch lags, say).
    let to_server = vec![SocketAddr::new(server.ip, 7100)];
    kube_proxy(
        &node,
        &[
            (SocketAddr::new(known, 80), to_server.clone()),
            (SocketAddr::new(unknown, 80), to_server),
        ],
    )
    .unwrap();
    let lagging = SocketAddr::new(unknown, 80);
    assert!(
        matches!(attempt(&node.ns.open(), lagging, b"q"), Outcome::Reply(r) if r.starts_with("server;")),
        "outside the mesh, kube-proxy serves {lagging} in plaintext"
    );
    // The captured client: the known Service over HBONE, the unknown one reset.
    assert!(
        matches!(attempt(&client.ns.open(), SocketAddr::new(known, 80), b"q"), Outcome::Reply(r) if r.starts_with("server;")),
        "{}",
        node.agent_log()
    );
    assert_eq!(attempt(&client.ns.open(), lagging, b"q"), Outcome::Reset);
    let log = node.agent_log();
    assert!(
        log.lines().any(|l| l.contains("connection failed")
            && l.contains(&format!("dst.addr={lagging} "))
            && l.contains("in the cluster's Service range but no known Service")),
        "{log}"
    );
    // Outside the range nothing changes: the node's own address is reached in plaintext.
    let gateway: IpAddr = node.subnet.replace(".0/24", ".1").parse().unwrap();
    echo_named(&node.ns.open(), 7600, "outside");
    assert!(
        matches!(attempt(&client.ns.open(), SocketAddr::new(gateway, 7600), b"q"), Outcome::Reply(r) if r.starts_with("outside;")),
        "{}",
        node.agent_log()
    );
}
