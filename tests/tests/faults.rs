//! Tier "faults": the agent killed (SIGKILL) in the middle of traffic. While it is down a
//! captured pod's new connections fail — refused inside the pod — and a packet capture of the
//! node, running throughout, shows that nothing but TLS to 15008 ever left a pod: no plaintext,
//! not the marker the client sends. A restarted agent re-adopts the pods without any CNI call.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ambit_tests::mesh::*;
use ambit_tests::*;

/// One new connection: sends `msg`, expects it echoed.
fn exchange(ns: &ambit_common::netns::Netns, dst: SocketAddr, msg: &[u8]) -> std::io::Result<()> {
    ns.run(|| -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(msg)?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        if back != msg {
            return Err(std::io::Error::other("echo differs"));
        }
        Ok(())
    })
    .map_err(std::io::Error::other)?
}

#[test]
fn sigkill_under_traffic_fails_closed_leaks_nothing_and_restart_readopts_without_cni() {
    let _alone = capture_alone();
    let dir = TempDir::new("faults");
    let mut node = Node::new("1.0.0").unwrap();
    // What crosses the wire is the proof here: same-node HBONE stays on it.
    node.agent_args = shortcut_args(false).to_vec();
    node.start_agent().unwrap();
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    echo_forever(&server.ns.open(), 7200);
    let dst = SocketAddr::new(server.ip, 7200);
    let marker = format!("AMBIT-MARKER-{}", unique("k"));
    let msg = format!("{marker}|{}", ".".repeat(1000)).into_bytes();
    let ns = client.ns.open();
    let adds_before = node.cni_log().matches("ADD ").count();

    let cap = Capture::start(&node.ns.name, &dir.0).unwrap();
    // Traffic flows; a long-lived connection is open when the agent dies.
    for _ in 0..20 {
        exchange(&ns, dst, &msg).unwrap();
    }
    let mut long = ns
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    long.write_all(&msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    long.read_exact(&mut back).unwrap();

    node.kill_agent();
    // The outage: every new connection is refused (the redirect still points at 15001, where
    // nothing listens); the open one is broken, not downgraded.
    let mut refused = 0;
    for _ in 0..20 {
        assert_eq!(
            attempt(&ns, dst, &msg),
            Outcome::Refused,
            "with the agent down"
        );
        refused += 1;
    }
    // The dead agent's socket was closed by the kernel (FIN); the write after it draws a
    // reset. Which of the two the read meets first is timing; both end the connection
    // without a byte of reply, and nothing else is accepted (no timeout, no data).
    let _ = long.write_all(&msg);
    let r = long.read_exact(&mut back).map_err(|e| e.kind());
    assert!(
        matches!(
            r,
            Err(std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset)
        ),
        "the long-lived connection went on without the agent: {r:?}"
    );

    let restarted = Instant::now();
    node.start_agent().unwrap();
    let mut attempts = 0;
    wait_for(Duration::from_secs(20), || {
        attempts += 1;
        exchange(&ns, dst, &msg).is_ok()
    })
    .unwrap_or_else(|_| panic!("no connection after restart:\n{}", node.agent_log()));
    let back_after = restarted.elapsed();
    for _ in 0..20 {
        exchange(&ns, dst, &msg).unwrap();
    }
    let pcap = cap.finish().unwrap();
    let tls = assert_only_tls("node during kill and restart", &pcap, marker.as_bytes());
    // And the traffic did cross as TLS: 42 exchanges that succeeded (20, the long one's first,
    // the first after the restart, 20 more), each message both ways. (A bound against a
    // capture that saw only some small TLS flow: TLS adds bytes, it does not lose any.)
    let want = 42 * 2 * msg.len();
    assert!(
        tls >= want * 9 / 10,
        "only {tls} TLS payload bytes crossed the node for {want} bytes of traffic"
    );
    assert_eq!(
        node.cni_log().matches("ADD ").count(),
        adds_before,
        "re-adoption needed a CNI call"
    );
    assert!(
        node.agent_log()
            .contains("re-adopted pods from the state directory")
    );
    eprintln!(
        "sigkill: {refused} connections refused during the outage; first success {:?} after the restart began ({attempts} attempts); capture {} bytes, {tls} TLS payload bytes, marker absent",
        back_after,
        pcap.len()
    );
}

#[test]
fn vanished_namespaces_are_forgotten_and_corrupt_or_old_records_do_not_stop_a_restart() {
    let _shared = beside_captures();
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let keep = node.add_pod("keep").unwrap();
    let gone = node.add_pod("gone").unwrap();
    let gone_id = gone.container_id.clone();
    assert_eq!(node.recorded_pods().len(), 2);

    // The namespace disappears and DEL never comes: the agent notices on its own.
    drop(gone);
    wait_for(Duration::from_secs(10), || {
        !node.recorded_pods().contains(&gone_id)
    })
    .unwrap_or_else(|_| panic!("vanished pod still recorded:\n{}", node.agent_log()));
    assert!(
        node.agent_log()
            .contains("namespace gone without DEL; pod forgotten")
    );

    // A crash leaves a corrupt record, a record from an older version and a stray file.
    node.kill_agent();
    let state = node.state_dir();
    std::fs::write(
        state.join("pod-corrupt.json"),
        b"{\"version\": 1, \"pod\": ",
    )
    .unwrap();
    std::fs::write(
        state.join("pod-old.json"),
        br#"{"version":0,"pod":{"container_id":"old"}}"#,
    )
    .unwrap();
    std::fs::write(state.join("notes.txt"), b"not a record").unwrap();
    node.start_agent().unwrap();
    let (st, body) = node.readiness();
    let ready = node.wait_ready(Duration::from_secs(10));
    assert!(
        ready.is_ok(),
        "not ready after restart ({st}: {body}):\n{}",
        node.agent_log()
    );
    let log = node.agent_log();
    assert!(log.contains("adopted: 1"), "{log}");
    assert!(
        log.contains("pod-corrupt.json"),
        "the corrupt record is reported:\n{log}"
    );
    assert!(log.contains("from another version"), "{log}");
    // The surviving pod is served, without a CNI call.
    let _srv = echo_server(&keep.ns.open(), 7600, 1);
    let peer = node.add_pod("peer").unwrap();
    let reply = talk(&peer.ns.open(), SocketAddr::new(keep.ip, 7600), b"still").unwrap();
    assert!(reply.ends_with("still"), "{reply}");
}
