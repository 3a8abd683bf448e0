//! Tier "authz": AuthorizationPolicy and PeerAuthentication enforced at the destination, on
//! real pods through HBONE and plaintext, with policies applied live from the manifests
//! directory.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use ambit_tests::mesh::*;
use ambit_tests::*;

const TD: &str = "cluster1";

struct Mesh {
    node: Node,
    manifests: std::path::PathBuf,
    _dir: TempDir,
}

fn mesh() -> Mesh {
    let dir = TempDir::new("authz");
    let manifests = dir.0.join("manifests");
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = manifest_args(&manifests, TD);
    node.start_agent().unwrap();
    Mesh {
        node,
        manifests,
        _dir: dir,
    }
}

fn pod(m: &mut Mesh, ns: &str, name: &str) -> Pod {
    let p = m.node.add_pod_in(ns, name).unwrap();
    write_pod_manifest(&m.manifests, &p, name, true);
    p
}

/// Writes a policy file and waits until the agent has taken it.
fn apply(m: &Mesh, file: &str, yaml: &str, key: &str) {
    let marks = m.node.agent_log().matches(key).count();
    let tmp = m.manifests.join(format!("{file}.tmp"));
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, m.manifests.join(file)).unwrap();
    wait_for(Duration::from_secs(10), || {
        m.node.agent_log().matches(key).count() > marks
    })
    .unwrap_or_else(|_| panic!("policy {key} not taken:\n{}", m.node.agent_log()));
}

fn remove(m: &Mesh, file: &str) {
    std::fs::remove_file(m.manifests.join(file)).unwrap();
}

/// True when `from` gets its message echoed by `to` (the echo server of `to` must be running).
fn reaches(from: &ambit_common::netns::Netns, to: SocketAddr) -> bool {
    talk(from, to, b"ping").is_ok_and(|r| r.ends_with(";ping"))
}

fn wait_reaches(from: &ambit_common::netns::Netns, to: SocketAddr, want: bool, m: &Mesh) {
    wait_for(Duration::from_secs(10), || reaches(from, to) == want)
        .unwrap_or_else(|_| panic!("expected reaches={want} for {to}:\n{}", m.node.agent_log()));
}

#[test]
fn the_mission_policy_lets_productpage_reach_ratings_and_refuses_reviews() {
    let mut m = mesh();
    let productpage = pod(&mut m, "default", "productpage");
    let reviews = pod(&mut m, "default", "reviews");
    let ratings = pod(&mut m, "default", "ratings");
    let intruder = pod(&mut m, "blocked", "intruder");
    wait_manifest_pods(&m.node, 4);
    let dst = SocketAddr::new(ratings.ip, 9080);
    echo_named(&ratings.ns.open(), 9080, "ratings");
    let (pp, rv, bad) = (productpage.ns.open(), reviews.ns.open(), intruder.ns.open());
    // Outside the mesh: the node itself, plaintext into 15006.
    let outside = m.node.ns.open();

    // No policy: everyone gets through.
    for from in [&pp, &rv, &bad, &outside] {
        assert!(reaches(from, dst), "{}", m.node.agent_log());
    }

    apply(
        &m,
        "ratings-viewer.yaml",
        RATINGS_VIEWER,
        "default/ratings-viewer",
    );
    assert!(reaches(&pp, dst), "productpage must reach ratings");
    // Refused means reset (401 at ratings resets the caller's connection; plaintext is
    // reset at 15006), before the app saw a byte.
    for (who, from) in [("reviews", &rv), ("intruder", &bad), ("outside", &outside)] {
        assert_eq!(attempt(from, dst, b"ping"), Outcome::Reset, "{who}");
    }
    let log = m.node.agent_log();
    assert!(
        log.lines().any(|l| l.contains("connection denied")
            && l.contains(&format!("src.identity=spiffe://{TD}/ns/default/sa/reviews"))
            && l.contains("allow policies exist, but none allowed")),
        "{log}"
    );
    assert!(
        log.contains("answered CONNECT with 401"),
        "HBONE refusal is a 401:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("connection denied") && l.contains("via=\"plaintext\"")),
        "{log}"
    );

    // A DENY by namespace, with the ALLOW gone.
    remove(&m, "ratings-viewer.yaml");
    wait_reaches(&rv, dst, true, &m);
    apply(
        &m,
        "deny-blocked.yaml",
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-blocked\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [blocked]\n",
        "default/deny-blocked",
    );
    assert_eq!(
        attempt(&bad, dst, b"ping"),
        Outcome::Reset,
        "the blocked namespace must be refused"
    );
    assert!(reaches(&rv, dst) && reaches(&pp, dst), "others still pass");
    assert!(
        m.node
            .agent_log()
            .contains("explicitly denied by default/deny-blocked"),
        "{}",
        m.node.agent_log()
    );

    // STRICT: plaintext from outside the mesh is refused, mesh clients still pass.
    assert!(reaches(&outside, dst), "PERMISSIVE admits plaintext");
    apply(
        &m,
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n",
        "default/default",
    );
    assert_eq!(
        attempt(&outside, dst, b"ping"),
        Outcome::Reset,
        "STRICT refuses plaintext"
    );
    assert!(reaches(&pp, dst), "STRICT admits mTLS");
    assert!(
        m.node
            .agent_log()
            .contains("STRICT mTLS: plaintext refused")
    );
}

/// The client's agent sends the app's first bytes right behind the CONNECT, before the answer:
/// when the destination refuses (401) they are discarded there, and the app never sees the
/// connection, let alone a byte.
#[test]
fn early_bytes_of_a_refused_stream_never_reach_the_app() {
    let mut m = mesh();
    let _productpage = pod(&mut m, "default", "productpage");
    let reviews = pod(&mut m, "default", "reviews");
    let ratings = pod(&mut m, "default", "ratings");
    wait_manifest_pods(&m.node, 3);
    apply(
        &m,
        "ratings-viewer.yaml",
        RATINGS_VIEWER,
        "default/ratings-viewer",
    );
    // The app: a listener nobody accepts from, so any connection the agent made to it would
    // wait in its queue.
    let app = ratings
        .ns
        .open()
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 9081)))
        .unwrap()
        .unwrap();
    app.set_nonblocking(true).unwrap();
    let (rv, dst) = (reviews.ns.open(), SocketAddr::new(ratings.ip, 9081));
    for _ in 0..3 {
        assert_eq!(
            attempt(&rv, dst, b"GET /secret HTTP/1.1\r\n\r\n"),
            Outcome::Reset
        );
    }
    let log = m.node.agent_log();
    let early = log
        .lines()
        .filter(|l| {
            l.contains("app bytes sent ahead of the CONNECT answer") && l.contains("ok=false")
        })
        .count();
    assert!(early >= 1, "the refused bytes were sent early:\n{log}");
    assert_eq!(log.matches("answered CONNECT with 401").count(), 3, "{log}");
    // The 401 came before the reset the client saw: the destination had decided by then.
    match app.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the app got a connection: {other:?}"),
    }
}

#[test]
fn a_policy_applied_during_a_connection_cuts_it_and_bad_policies_fail_closed() {
    let mut m = mesh();
    let reviews = pod(&mut m, "default", "reviews");
    let ratings = pod(&mut m, "default", "ratings");
    wait_manifest_pods(&m.node, 2);
    let dst = SocketAddr::new(ratings.ip, 9080);
    echo_named(&ratings.ns.open(), 9080, "ratings");
    let mut c = connect_in(&reviews.ns.open(), dst).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"one").unwrap();
    let mut buf = [0u8; 256];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("one"));

    apply(
        &m,
        "deny-reviews.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-reviews\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: ratings\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster1/ns/default/sa/reviews\"]\n",
        "default/deny-reviews",
    );
    // The open connection is cut with a reset (the stream is reset, the agent aborts the
    // app's socket): the waiting read fails with it, neither EOF nor the 10 s timeout.
    let r = c.read(&mut buf);
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the connection must be reset"
    );
    let log = m.node.agent_log();
    assert!(
        log.contains("open connection closed: a policy change denies it"),
        "{log}"
    );

    // An invalid ALLOW (bad CIDR) fails closed for its scope and says which field.
    remove(&m, "deny-reviews.yaml");
    wait_reaches(&reviews.ns.open(), dst, true, &m);
    apply(
        &m,
        "broken.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/33\"]\n",
        "default/broken",
    );
    assert_eq!(
        attempt(&reviews.ns.open(), dst, b"ping"),
        Outcome::Reset,
        "an unparsable ALLOW must not widen access"
    );
    let log = m.node.agent_log();
    assert!(
        log.contains("spec.rules[0].from[0].source.ipBlocks[0]") && log.contains("fails closed"),
        "{log}"
    );
    // Malformed YAML next to it is reported and changes nothing else: with the broken policy
    // gone, the garbage alone neither denies nor takes the pods' objects with it.
    std::fs::write(m.manifests.join("garbage.yaml"), "kind: [unclosed\n").unwrap();
    wait_for(Duration::from_secs(10), || {
        m.node.agent_log().contains("garbage.yaml")
    })
    .unwrap();
    remove(&m, "broken.yaml");
    wait_reaches(&reviews.ns.open(), dst, true, &m);
}

#[test]
fn inbound_plaintext_is_served_only_for_the_pod_s_own_addresses() {
    let mut m = mesh();
    let target = pod(&mut m, "default", "target");
    wait_manifest_pods(&m.node, 1);
    echo_named(&target.ns.open(), 7100, "target");
    let node = m.node.ns.open();
    // The control: the node (outside the mesh) reaches the pod's own address in plaintext.
    assert!(reaches(&node, SocketAddr::new(target.ip, 7100)));
    // A neighbour (the node) routes two other destinations to the pod: a foreign address,
    // and one the pod has besides its pod IP. The inbound redirect takes only locally
    // addressed packets (`fib daddr type local`): the foreign one is never handed to the agent
    // (the pod does not forward, the SYN is dropped); the secondary one reaches 15006 and the
    // agent refuses it (reset) without connecting anywhere for the neighbour.
    let foreign: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    let secondary: std::net::IpAddr = "198.51.100.8".parse().unwrap();
    target
        .ns
        .exec(&["ip", "addr", "add", "198.51.100.8/32", "dev", "eth0"])
        .unwrap();
    for ip in [foreign, secondary] {
        m.node
            .ns
            .exec(&[
                "ip",
                "route",
                "add",
                &format!("{ip}/32"),
                "via",
                &target.ip.to_string(),
            ])
            .unwrap();
    }
    let to = SocketAddr::new(foreign, 7100);
    assert_eq!(attempt(&node, to, b"ping"), Outcome::Timeout, "{to}");
    let log = m.node.agent_log();
    assert!(
        !log.contains(&format!("dst.addr={to} ")),
        "the agent must never see {to}:\n{log}"
    );
    let to = SocketAddr::new(secondary, 7100);
    assert_eq!(
        attempt(&node, to, b"ping"),
        Outcome::Reset,
        "{to}:\n{}",
        m.node.agent_log()
    );
    let log = m.node.agent_log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("dst.addr={to} ")))
        .collect();
    assert!(
        lines.len() == 1
            && lines[0].contains("connection refused")
            && lines[0].contains("not an address of this pod"),
        "one refusal and no upstream attempt for {to}: {lines:#?}"
    );
}

#[test]
fn inbound_to_a_pod_its_source_does_not_know_is_refused_until_it_is_known() {
    let mut m = mesh();
    let known = pod(&mut m, "default", "known");
    // Captured through CNI, but not (yet) in the workload source.
    let stranger = m.node.add_pod("stranger").unwrap();
    wait_manifest_pods(&m.node, 1);
    echo_named(&stranger.ns.open(), 7110, "stranger");
    let to = SocketAddr::new(stranger.ip, 7110);
    // From a mesh pod and from outside the mesh alike: reset, with the reason logged.
    for (who, ns) in [("known", known.ns.open()), ("node", m.node.ns.open())] {
        assert_eq!(attempt(&ns, to, b"ping"), Outcome::Reset, "from {who}");
    }
    let log = m.node.agent_log();
    assert!(
        log.matches("pod default/stranger is unknown to the workload source")
            .count()
            >= 2,
        "{log}"
    );
    // Once its Pod object arrives, it is served (no restart, no new ADD).
    write_pod_manifest(&m.manifests, &stranger, "stranger", true);
    wait_manifest_pods(&m.node, 2);
    assert_eq!(
        attempt(&known.ns.open(), to, b"ping"),
        Outcome::Reply(format!("stranger;peer={};ping", known.ip)),
    );
}

#[test]
fn with_allow_unknown_pods_a_pod_its_source_does_not_know_is_served() {
    let dir = TempDir::new("authz");
    let manifests = dir.0.join("manifests");
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = manifest_args(&manifests, TD);
    node.agent_args.push("--allow-unknown-pods".into());
    node.start_agent().unwrap();
    let mut m = Mesh {
        node,
        manifests,
        _dir: dir,
    };
    let known = pod(&mut m, "default", "known");
    let stranger = m.node.add_pod("stranger").unwrap();
    wait_manifest_pods(&m.node, 1);
    echo_named(&stranger.ns.open(), 7111, "stranger");
    let to = SocketAddr::new(stranger.ip, 7111);
    assert_eq!(
        attempt(&known.ns.open(), to, b"ping"),
        Outcome::Reply(format!("stranger;peer={};ping", known.ip)),
        "{}",
        m.node.agent_log()
    );
    let from_node = attempt(&m.node.ns.open(), to, b"ping");
    assert!(
        matches!(&from_node, Outcome::Reply(r) if r.starts_with("stranger;peer=") && r.ends_with(";ping")),
        "from the node: {from_node:?}"
    );
}
