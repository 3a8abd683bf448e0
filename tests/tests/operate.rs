//! Tier "operate": metrics after real traffic, readiness across pods and restarts, the admin
//! endpoint, configuration errors (exit 64), and draining on SIGTERM.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use ambit_tests::mesh::{manifest_args, write_pod_manifest};
use ambit_tests::*;

const TD: &str = "cluster1";

#[test]
fn metrics_count_real_traffic_with_istio_labels_and_a_pods_series_leave_with_it() {
    let dir = TempDir::new("ops");
    let manifests = dir.0.join("manifests");
    let mut node = Node::with_agent(manifest_args(&manifests, TD));
    let pp = node.add_pod("productpage").unwrap();
    let ratings = node.add_pod("ratings").unwrap();
    write_pod_manifest(&manifests, &pp, "productpage", true);
    write_pod_manifest(&manifests, &ratings, "ratings", true);
    wait_for(Duration::from_secs(10), || {
        node.agent_log().contains("pods=2 ")
    })
    .unwrap();

    let dst = SocketAddr::new(ratings.ip, 9080);
    let server = echo_server(&ratings.ns.open(), 9080, 4);
    let mut reply_len = 0;
    for _ in 0..3 {
        let r = talk(&pp.ns.open(), dst, b"hello").unwrap();
        reply_len = r.len();
    }
    // One plaintext connection from outside the mesh (the node itself).
    talk(&node.ns.open(), dst, b"plain").unwrap();
    server.join().unwrap();

    let want = |reporter| {
        vec![
            ("reporter", reporter),
            ("source_workload", "productpage"),
            ("source_workload_namespace", "default"),
            (
                "source_principal",
                "spiffe://cluster1/ns/default/sa/productpage",
            ),
            ("source_app", "productpage"),
            ("destination_workload", "ratings"),
            (
                "destination_principal",
                "spiffe://cluster1/ns/default/sa/ratings",
            ),
            ("destination_app", "ratings"),
            ("connection_security_policy", "mutual_tls"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
        ]
    };
    // The plaintext one: reported by the destination only, without identity.
    let plain = [
        ("reporter", "destination"),
        ("destination_workload", "ratings"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "unknown"),
    ];
    let mut text = String::new();
    // Counters are final once each side recorded the close (the apps may be done before the
    // agent is); bounded wait for both reporters and the plaintext connection.
    wait_for(Duration::from_secs(5), || {
        text = node.scrape("/metrics", 15020);
        metric(
            &text,
            "istio_tcp_connections_closed_total",
            &want("destination"),
        ) == Some(3.0)
            && metric(&text, "istio_tcp_connections_closed_total", &want("source")) == Some(3.0)
            && metric(&text, "istio_tcp_connections_closed_total", &plain) == Some(1.0)
    })
    .unwrap_or_else(|_| panic!("closed counters:\n{text}"));
    for reporter in ["source", "destination"] {
        let l = want(reporter);
        assert_eq!(
            metric(&text, "istio_tcp_connections_opened_total", &l),
            Some(3.0),
            "{reporter}\n{text}"
        );
        assert_eq!(
            metric(&text, "istio_tcp_received_bytes_total", &l),
            Some(15.0),
            "{reporter}"
        );
        assert_eq!(
            metric(&text, "istio_tcp_sent_bytes_total", &l),
            Some(3.0 * reply_len as f64),
            "{reporter}"
        );
    }
    // The access log names both workloads, on both sides.
    let log = node.agent_log();
    let lines = log
        .lines()
        .filter(|l| {
            l.contains("connection complete")
                && l.contains("src.workload=productpage dst.workload=ratings")
        })
        .count();
    assert_eq!(lines, 6, "3 connections, logged by each side:\n{log}");
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &plain),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_received_bytes_total", &plain),
        Some(5.0)
    );
    // The agent's own figures.
    assert_eq!(
        metric(&text, "ambit_pods_captured", &[]),
        Some(2.0),
        "{text}"
    );
    // Both pods are declared in the manifests: the store knows two Pod objects, and timed
    // each change.
    assert_eq!(metric(&text, "ambit_store_pods", &[]), Some(2.0), "{text}");
    assert!(
        metric(&text, "ambit_store_pod_change_seconds_count", &[]).is_some_and(|n| n >= 2.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "ambit_cni_requests_total",
            &[("command", "ADD"), ("result", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "ambit_cni_handoff_seconds_count", &[]),
        Some(2.0)
    );
    assert!(
        metric(
            &text,
            "ambit_certificate_expiry_timestamp_seconds",
            &[("identity", "spiffe://cluster1/ns/default/sa/productpage")]
        )
        .is_some_and(|t| t > 1.7e9),
        "{text}\n{}",
        node.agent_log()
    );
    assert_eq!(
        metric(
            &text,
            "ambit_authz_decisions_total",
            &[("decision", "allow")]
        ),
        Some(4.0)
    );

    // The pod goes: the series it reported go too.
    let out = node.cnitool("del", &pp.ns, &pp.container_id, &Node::pod_args(&pp));
    assert!(out.status.success());
    let text = node.scrape("/metrics", 15020);
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &want("source")),
        None,
        "series of a deleted pod:\n{text}"
    );
    assert_eq!(metric(&text, "ambit_pods_captured", &[]), Some(1.0));
    assert!(
        metric(
            &text,
            "istio_tcp_connections_opened_total",
            &want("destination")
        )
        .is_some(),
        "the remaining pod keeps its own series"
    );
}

#[test]
fn readiness_follows_pods_and_restarts() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    wait_for(Duration::from_secs(5), || node.readiness().0 == 200).unwrap();
    let a = node.add_pod("a").unwrap();
    assert_eq!(
        node.readiness().0,
        200,
        "a served pod keeps the agent ready"
    );

    // While the agent is down, something else takes 15006 inside the pod: after the restart
    // the pod cannot be served, and the agent says so.
    node.kill_agent();
    let blocker =
        a.ns.open()
            .run(|| std::net::TcpListener::bind(("::", 15006)))
            .unwrap()
            .unwrap();
    node.start_agent().unwrap();
    let mut body = String::new();
    wait_for(Duration::from_secs(5), || {
        let r = node.readiness();
        body = r.1;
        r.0 == 503
    })
    .unwrap();
    assert!(
        body.contains("default/a") && body.contains("not served"),
        "{body}"
    );
    let text = node.scrape("/metrics", 15020);
    assert_eq!(
        metric(&text, "ambit_pods_unserved", &[]),
        Some(1.0),
        "{text}"
    );
    assert!(node.agent_log().contains("UNPROTECTED"));

    // The port is free again: the next reconcile serves the pod and readiness comes back.
    drop(blocker);
    wait_for(Duration::from_secs(10), || node.readiness().0 == 200)
        .unwrap_or_else(|_| panic!("{}", node.agent_log()));
    let b = node.add_pod("b").unwrap();
    let server = echo_server(&b.ns.open(), 7000, 1);
    assert!(talk(&a.ns.open(), SocketAddr::new(b.ip, 7000), b"x").is_ok());
    server.join().unwrap();
}

#[test]
fn admin_is_loopback_only_shows_state_without_keys_and_changes_the_log_level() {
    let dir = TempDir::new("ops");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("bad-policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: broken\n  namespace: other\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
    )
    .unwrap();
    let mut node = Node::with_agent(manifest_args(&manifests, TD));
    let a = node.add_pod("a").unwrap();
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let mut dump = String::new();
    wait_for(Duration::from_secs(5), || {
        dump = http(&node.ns.open(), admin, "GET", "/config_dump")
            .unwrap()
            .1;
        dump.contains("\"serial\"")
    })
    .unwrap_or_else(|_| panic!("{dump}"));
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["pods"][0]["name"], "a");
    assert_eq!(
        v["pods"][0]["identity"],
        format!("spiffe://{TD}/ns/default/sa/default")
    );
    assert_eq!(
        v["certificates"][0]["identity"],
        format!("spiffe://{TD}/ns/default/sa/default")
    );
    assert_eq!(v["policies"][0]["name"], "other/broken");
    assert_eq!(v["policies"][0]["state"], "Rejected");
    assert!(
        v["policies"][0]["messages"][0]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].to[0].operation.ports[0]")
    );
    assert!(
        !dump.contains("PRIVATE KEY") && !dump.contains("BEGIN"),
        "key material in the dump"
    );
    assert_eq!(v["config"]["trust-domain"], TD);

    // Runtime log level.
    let (st, body) = http(&node.ns.open(), admin, "POST", "/logging?level=warn").unwrap();
    assert_eq!((st, body.trim()), (200, "warn"));
    assert_eq!(
        http(&node.ns.open(), admin, "GET", "/logging")
            .unwrap()
            .1
            .trim(),
        "warn"
    );
    assert_eq!(
        http(&node.ns.open(), admin, "POST", "/logging?level=[[")
            .unwrap()
            .0,
        400
    );

    // Not reachable from a pod: the node's bridge address answers metrics, never admin.
    let gw: std::net::IpAddr = node.subnet.replace(".0/24", ".1").parse().unwrap();
    let pod = a.ns.open();
    // (The pod's connection is captured and forwarded by its own proxy, which finds nothing
    // listening there and closes it: no answer either way.)
    let r = http(&pod, SocketAddr::new(gw, 15000), "GET", "/config_dump");
    assert!(
        r.as_ref().map_or(true, |(st, _)| *st == 0),
        "admin answered a pod: {r:?}"
    );
    assert_eq!(
        http(&pod, SocketAddr::new(gw, 15020), "GET", "/metrics")
            .unwrap()
            .0,
        200
    );
}

#[test]
fn invalid_configuration_exits_64_naming_the_key_and_value() {
    require_root();
    let dir = TempDir::new("cfg");
    let file = dir.0.join("agent.yaml");
    let cases: Vec<(Vec<String>, Option<&str>, &[&str])> = vec![
        (
            vec!["--admin-address".into(), "0.0.0.0:15000".into()],
            None,
            &["admin-address", "0.0.0.0:15000", "loopback"],
        ),
        (
            vec!["--cert-lifetime".into(), "soon".into()],
            None,
            &["cert-lifetime", "soon"],
        ),
        (
            vec!["--trust-domain".into(), "a/b".into()],
            None,
            &["trust-domain", "a/b"],
        ),
        (
            vec!["--inbound-idle-timeout".into(), "500ms".into()],
            None,
            &["inbound-idle-timeout", "500ms"],
        ),
        (
            vec!["--manifests-dir".into(), "/nonexistent/ambit".into()],
            None,
            &["manifests-dir", "/nonexistent/ambit"],
        ),
        (
            vec!["--config".into(), file.display().to_string()],
            Some("trust-domian: x\n"),
            &["unknown key", "trust-domian"],
        ),
        (
            vec!["--config".into(), file.display().to_string()],
            Some("drain-timeout: forever\n"),
            &["drain-timeout", "forever", "agent.yaml"],
        ),
        (
            vec!["--config".into(), file.display().to_string()],
            Some("log-format: xml\n"),
            &["log-format", "xml"],
        ),
    ];
    for (args, content, want) in cases {
        if let Some(c) = content {
            std::fs::write(&file, c).unwrap();
        }
        let out = Command::new(&bins().agent)
            .args(&args)
            .env_clear()
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: {w:?} missing in {err}");
        }
    }
    // Environment variables are checked the same way.
    let out = Command::new(&bins().agent)
        .env_clear()
        .env("AMBIT_CERT_LIFETIME", "0s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cert-lifetime"));
}

#[test]
fn sigterm_stops_accepting_drains_and_cuts_what_is_left() {
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = vec!["--drain-timeout".into(), "2s".into()];
    node.start_agent().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let dst = SocketAddr::new(b.ip, 7400);
    let l =
        b.ns.open()
            .run(|| std::net::TcpListener::bind(("0.0.0.0", 7400)))
            .unwrap()
            .unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 64];
        let mut total = 0;
        // Bounded: a drained connection ends within the test's limits.
        for _ in 0..100 {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    if c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        total
    });
    let mut c = connect_in(&a.ns.open(), dst).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    c.write_all(b"1").unwrap();
    c.read_exact(&mut buf[..1]).unwrap();

    // The control for "stops accepting": a second app on B answers new connections now.
    echo_named(&b.ns.open(), 7401, "second");
    let second = SocketAddr::new(b.ip, 7401);
    assert_eq!(
        attempt(&a.ns.open(), second, b"new"),
        Outcome::Reply(format!("second;peer={};new", a.ip))
    );

    let pid = node.agent_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Stops accepting: a new connection from A is refused at its SYN (nothing listens on
    // 15001 any more: fail closed), ...
    wait_for(Duration::from_secs(5), || {
        attempt(&a.ns.open(), second, b"new") == Outcome::Refused
    })
    .unwrap_or_else(|_| panic!("new connections were still taken:\n{}", node.agent_log()));
    // ...while the open one still works during the drain.
    c.write_all(b"2").unwrap();
    c.read_exact(&mut buf[..1]).unwrap();
    assert_eq!(&buf[..1], b"2");
    let status = node.terminate_agent(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "{status:?}");
    let log = node.agent_log();
    // One connection between two pods of this node is two proxied legs, A's outbound and B's
    // inbound, and B's inbound leg is a stream of an HBONE connection (left open by it).
    assert!(
        log.contains(
            "drained: 2 proxied connections and 1 inbound HBONE connections still open at the deadline are cut"
        ),
        "{log}"
    );
    // Both cut legs are in the access log, as cut: their lines were written before the agent
    // exited (a data-path thread keeps its lines until it runs out of work or ends). The pods'
    // proxies are stopped one after the other, microseconds apart, so the leg stopped second
    // can first see its peer leg's cut (the HBONE connection closed under it, and its line
    // says so); the one stopped first always says why.
    let cut: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("dst.addr={dst} ")) && l.contains("connection complete"))
        .collect();
    assert!(
        cut.len() == 2
            && cut.iter().all(|l| !l.contains("error=\"\""))
            && cut
                .iter()
                .any(|l| l.contains("error=\"closed: the pod's proxy stopped\"")),
        "{cut:#?}\n{log}"
    );
    // Cut with a reset: the app must not take the end for an orderly close (a reply that
    // looks complete).
    let r = c.read(&mut buf).map_err(|e| e.kind());
    assert_eq!(r, Err(std::io::ErrorKind::ConnectionReset));
    assert_eq!(server.join().unwrap(), 2);
    // And the pods stay fail-closed with the agent gone.
    let err = talk(&a.ns.open(), dst, b"x").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn flushed_rules_are_found_and_reinstalled_without_a_cni_call() {
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = vec!["--verify-seconds".into(), "0.2".into()];
    node.start_agent().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    // Someone flushes A's capture: its table and its policy routing.
    a.ns.exec(&["nft", "delete", "table", "inet", "ambit"])
        .unwrap();
    a.ns.exec(&[
        "ip",
        "rule",
        "del",
        "fwmark",
        "0x111/0xfff",
        "lookup",
        "100",
    ])
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        a.ns.exec(&["nft", "list", "table", "inet", "ambit"])
            .is_ok_and(|r| r.contains("redirect to :15001"))
            && a.ns
                .exec(&["ip", "rule"])
                .is_ok_and(|r| r.contains("lookup 100"))
    })
    .unwrap_or_else(|_| panic!("rules not reinstalled:\n{}", node.agent_log()));
    assert!(
        node.agent_log()
            .contains("were missing or altered: reinstalled")
    );
    // And A's traffic is captured again: through HBONE, logged by A's outbound side.
    let dst = SocketAddr::new(b.ip, 7500);
    let server = echo_server(&b.ns.open(), 7500, 1);
    assert_eq!(
        talk(&a.ns.open(), dst, b"x").unwrap(),
        format!("peer={};x", a.ip)
    );
    server.join().unwrap();
    wait_for(Duration::from_secs(5), || {
        access_lines(&node.agent_log(), "outbound", dst) == 1
    })
    .unwrap_or_else(|_| panic!("A's connection was not captured:\n{}", node.agent_log()));
    let text = node.scrape("/metrics", 15020);
    assert!(
        metric(&text, "ambit_rules_repaired_total", &[]).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "ambit_pods_unprotected", &[]), Some(0.0));
    assert_eq!(node.readiness().0, 200);
}

/// In a cluster the agent's stderr is a pipe the container runtime reads. A reader that
/// stalls (a rotation, a busy shim) must cost log lines, never traffic: most lines are
/// access-log lines written by the data-path threads, and a blocked write would stall every
/// connection those threads carry. Here nobody ever reads the pipe; 300 new connections (two
/// access lines each, far beyond the pipe's 64 KiB) must all be served, and the lines that
/// did not fit are counted in /metrics.
#[test]
fn a_stalled_log_reader_costs_log_lines_not_connections() {
    let dir = TempDir::new("stderr");
    let fifo = dir.0.join("stderr.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Opened for reading too, so that opening it does not wait for a reader; never read.
    let stderr = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = vec!["--log".into(), "info".into()];
    node.start_agent_with_stderr(stderr).unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    echo_forever(&b.ns.open(), 7800);
    let dst = SocketAddr::new(b.ip, 7800);
    let from = a.ns.open();
    for i in 0..300 {
        let outcome = attempt(&from, dst, b"x");
        assert_eq!(
            outcome,
            Outcome::Reply("x".into()),
            "connection {i}: the data path waited for the log's reader"
        );
    }
    let dropped = metric(
        &node.scrape("/metrics", 15020),
        "ambit_log_lines_dropped_total",
        &[],
    );
    assert!(
        dropped.is_some_and(|d| d > 0.0),
        "lines that did not fit the pipe must be counted: {dropped:?}"
    );
}
