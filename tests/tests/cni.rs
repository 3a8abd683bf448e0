//! Tier "libcni": the plugin and agent driven by a real libcni client (Debian's libcni 1.1.2),
//! plus direct invocations with the spec's environment for STATUS/GC (1.1.0) and bad input.

use std::net::SocketAddr;
use std::time::Duration;

use ambit_tests::*;

/// The pod's nftables ruleset, table by table in name order (a table replaced by a second
/// ADD is listed after the others, so kernel order is not a content difference).
fn ruleset(pod: &Pod) -> String {
    let tables = pod.ns.exec(&["nft", "list", "tables"]).unwrap();
    let mut names: Vec<&str> = tables
        .lines()
        .filter_map(|l| l.strip_prefix("table "))
        .collect();
    names.sort();
    names
        .iter()
        .map(|t| {
            let mut args = vec!["nft", "list", "table"];
            args.extend(t.split(' '));
            pod.ns.exec(&args).unwrap()
        })
        .collect()
}

#[test]
fn add_check_del_del_for_every_libcni_version() {
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        let mut node = Node::new(version).unwrap();
        node.start_agent().unwrap();
        let pod = node.add_pod("web").unwrap();
        let rules = ruleset(&pod);
        for want in [
            "table inet ambit",
            "meta l4proto tcp redirect to :15001",
            "meta l4proto tcp fib daddr type local redirect to :15006",
            "tcp dport 15008 accept",
            "ct mark 0x00000222 accept",
            "table inet ambit-agent-",
            "socket cgroupv2 level",
            "oifname \"lo\" accept",
            "ip saddr 169.254.7.127 accept",
            "ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff accept",
        ] {
            assert!(
                rules.contains(want),
                "{version}: missing {want:?} in\n{rules}"
            );
        }
        let rule = pod.ns.exec(&["ip", "rule"]).unwrap();
        assert!(rule.contains("fwmark 0x111/0xfff lookup 100"), "{rule}");
        let route = pod
            .ns
            .exec(&["ip", "route", "show", "table", "100"])
            .unwrap();
        assert!(route.contains("local default dev lo"), "{route}");
        assert_eq!(node.recorded_pods(), vec![pod.container_id.clone()]);

        let args = Node::pod_args(&pod);
        if version != "0.3.1" {
            // libcni itself refuses CHECK below 0.4.0.
            let out = node.cnitool("check", &pod.ns, &pod.container_id, &args);
            assert!(
                out.status.success(),
                "{version} CHECK: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for round in 0..2 {
            let out = node.cnitool("del", &pod.ns, &pod.container_id, &args);
            assert!(
                out.status.success(),
                "{version} DEL #{round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            !ruleset(&pod).contains("table inet ambit"),
            "{version}: rules left after DEL"
        );
        assert!(
            node.recorded_pods().is_empty(),
            "{version}: agent still records the pod"
        );
    }
}

#[test]
fn check_fails_when_rules_are_flushed() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let pod = node.add_pod("flushed").unwrap();
    pod.ns
        .exec(&["nft", "delete", "table", "inet", "ambit"])
        .unwrap();
    let out = node.cnitool("check", &pod.ns, &pod.container_id, &Node::pod_args(&pod));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("redirect rules are missing"), "{err}");
}

#[test]
fn add_twice_replaces_rules_atomically() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let pod = node.add_pod("twice").unwrap();
    let before = ruleset(&pod);
    let mut conf = node.plugin_conf();
    conf["prevResult"] =
        serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{}/24", pod.ip)}]});
    let path = pod.ns.path();
    let out = node.invoke_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", &pod.container_id),
            ("CNI_NETNS", path.to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", &Node::pod_args(&pod)),
        ],
        conf.to_string().as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = ruleset(&pod);
    assert_eq!(
        before, after,
        "a second ADD must leave exactly one copy of the rule set"
    );
    assert_eq!(after.matches("redirect to :15001").count(), 1);
    // The second ADD prints prevResult back unchanged.
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, conf["prevResult"]);
}

#[test]
fn capture_is_proven_on_the_data_path() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let dst = SocketAddr::new(b.ip, 8080);
    let server = echo_server(&b.ns.open(), 8080, 3);

    let reply = talk(&a.ns.open(), dst, b"marker-from-a").unwrap();
    // The app in B sees A's pod IP (source preserved through the inbound proxy).
    assert_eq!(reply, format!("peer={};marker-from-a", a.ip));
    wait_for(Duration::from_secs(5), || {
        let log = node.agent_log();
        access_lines(&log, "outbound", dst) == 1 && access_lines(&log, "inbound", dst) == 1
    })
    .unwrap_or_else(|_| {
        panic!(
            "agent did not log the proxied connection:\n{}",
            node.agent_log()
        )
    });

    // B's own loopback traffic is not captured.
    let lo = SocketAddr::from(([127, 0, 0, 1], 8080));
    let reply = talk(&b.ns.open(), lo, b"local").unwrap();
    assert_eq!(reply, "peer=127.0.0.1;local");
    // A fence: a later captured connection's lines are logged, so a line for the loopback
    // one (had it been captured, it ended first) would be there too.
    talk(&a.ns.open(), dst, b"fence").unwrap();
    server.join().unwrap();
    wait_for(Duration::from_secs(5), || {
        let log = node.agent_log();
        access_lines(&log, "inbound", dst) == 2 && access_lines(&log, "outbound", dst) == 2
    })
    .unwrap_or_else(|_| panic!("the fence was not logged:\n{}", node.agent_log()));
    let log = node.agent_log();
    assert_eq!(
        access_lines(&log, "outbound", lo),
        0,
        "loopback was captured:\n{log}"
    );
    assert_eq!(access_lines(&log, "outbound", dst), 2);
}

#[test]
fn agent_down_fails_closed_and_restart_recaptures_without_cni() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let dst = SocketAddr::new(b.ip, 9090);
    let server = echo_server(&b.ns.open(), 9090, 1);

    node.kill_agent();
    let err = talk(&a.ns.open(), dst, b"must-not-leave").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // A new pod cannot start while the agent is down: ADD fails with code 11.
    let c = NsGuard::new(unique("ap")).unwrap();
    let out = node.cnitool(
        "add",
        &c,
        "cdown1",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=c",
    );
    assert!(!out.status.success());
    let log = node.cni_log();
    assert!(
        log.contains("ambit-agent is not reachable") && log.contains("(11)"),
        "{log}"
    );
    // ...and what the failed ADD installed was rolled back (the runtime does not start a pod
    // whose ADD failed; it retries with a new sandbox): no Ambit table, no policy routing.
    let left = c.exec(&["nft", "list", "ruleset"]).unwrap();
    assert!(!left.contains("ambit"), "{left}");
    let rules = c.exec(&["ip", "rule"]).unwrap();
    assert!(!rules.contains("lookup 100"), "{rules}");

    let started = std::time::Instant::now();
    node.start_agent().unwrap();
    // Bounded wait so a broken re-adoption fails instead of hanging; the figure is printed,
    // not asserted (speed belongs in benchmarks).
    wait_for(Duration::from_secs(5), || {
        talk(&a.ns.open(), dst, b"x").is_ok()
    })
    .expect("the restarted agent did not serve the recorded pods again");
    eprintln!(
        "re-adopted and serving {:?} after restart",
        started.elapsed()
    );
    server.join().unwrap();
    let log = node.agent_log();
    assert!(log.contains("adopted: 2"), "{log}");
}

#[test]
fn status_and_gc_for_spec_1_1_0() {
    let mut node = Node::new("1.0.0").unwrap();
    let mut conf = node.plugin_conf();
    conf["cniVersion"] = "1.1.0".into();
    let status =
        |node: &Node| node.invoke_plugin(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());

    // Agent down: code 50.
    let out = status(&node);
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 50, "{err}");
    assert_eq!(err["cniVersion"], "1.1.0");

    node.start_agent().unwrap();
    let out = status(&node);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());

    let keep = node.add_pod("keep").unwrap();
    let drop = node.add_pod("drop").unwrap();
    assert_eq!(node.recorded_pods().len(), 2);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": keep.container_id, "ifname": "eth0"}]);
    let out = node.invoke_plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        gc.to_string().as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(node.recorded_pods(), vec![keep.container_id.clone()]);
    assert!(!node.recorded_pods().contains(&drop.container_id));

    // STATUS and GC do not exist before 1.1.0.
    let out = node.invoke_plugin(
        &[("CNI_COMMAND", "STATUS")],
        node.plugin_conf().to_string().as_bytes(),
    );
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 1);
}

#[test]
fn version_answers_without_side_effects() {
    let node = Node::new("1.0.0").unwrap();
    let out = node.invoke_plugin(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"0.4.0"}"#);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    assert!(
        !node.dir.0.join("cni.log").exists(),
        "VERSION must not even open the log"
    );
}

#[test]
fn bad_input_gets_the_exact_error_code_and_leaves_nothing() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let pod = NsGuard::new(unique("ap")).unwrap();
    let path = pod.path();
    let netns = path.to_str().unwrap();
    let good = {
        let mut c = node.plugin_conf();
        c["prevResult"] =
            serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.250.0.9/24"}]});
        c.to_string()
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c: serde_json::Value = serde_json::from_str(&good).unwrap();
        f(&mut c);
        c.to_string()
    };
    let env_ok = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, String)> {
        let mut e: Vec<(&'static str, String)> = vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "cbad1".into()),
            ("CNI_NETNS", netns.into()),
            ("CNI_IFNAME", "eth0".into()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad".into(),
            ),
        ];
        for (k, v) in extra {
            e.retain(|(ek, _)| ek != k);
            if !v.is_empty() || *k == "CNI_NETNS" {
                e.push((k, v.to_string()));
            }
        }
        e
    };
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String, u32);
    let cases: Vec<Case> = vec![
        ("invalid JSON", env_ok(&[]), "{\"cniVersion\": ".into(), 6),
        (
            "missing prevResult",
            env_ok(&[]),
            with(&|c| {
                c.as_object_mut().unwrap().remove("prevResult");
            }),
            7,
        ),
        (
            "invalid prevResult",
            env_ok(&[]),
            with(&|c| c["prevResult"] = "nope".into()),
            7,
        ),
        (
            "bad prevResult IP",
            env_ok(&[]),
            with(&|c| c["prevResult"]["ips"][0]["address"] = "300.1.1.1/24".into()),
            7,
        ),
        (
            "unsupported cniVersion",
            env_ok(&[]),
            with(&|c| c["cniVersion"] = "0.2.0".into()),
            1,
        ),
        (
            "missing CNI_NETNS",
            env_ok(&[("CNI_NETNS", "")]),
            good.clone(),
            4,
        ),
        (
            "missing CNI_CONTAINERID",
            env_ok(&[("CNI_CONTAINERID", "")]),
            good.clone(),
            4,
        ),
        (
            "netns is not a netns",
            env_ok(&[("CNI_NETNS", "/proc/self/status")]),
            good.clone(),
            4,
        ),
        (
            "netns path missing",
            env_ok(&[("CNI_NETNS", "/var/run/netns/ambit-no-such-ns")]),
            good.clone(),
            4,
        ),
        (
            "malformed CNI_ARGS",
            env_ok(&[("CNI_ARGS", "K8S_POD_NAME")]),
            good.clone(),
            4,
        ),
        (
            "unknown command",
            env_ok(&[("CNI_COMMAND", "FROB")]),
            good.clone(),
            4,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = node.invoke_plugin(&env, stdin.as_bytes());
        assert!(!out.status.success(), "{what}: succeeded");
        let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{what}: stdout is not an error object ({e}): {:?}",
                out.stdout
            )
        });
        assert_eq!(err["code"], code, "{what}: {err}");
        assert!(
            err["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {err}"
        );
        assert!(
            err["details"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {err}"
        );
        // Nothing left behind: no rules in the pod, no record in the agent.
        let rules = pod.exec(&["nft", "list", "ruleset"]).unwrap();
        assert!(!rules.contains("ambit"), "{what}: rules left behind");
        assert!(
            node.recorded_pods().is_empty(),
            "{what}: agent recorded a pod"
        );
    }
}

#[test]
fn del_succeeds_without_netns_prevresult_or_agent() {
    let mut node = Node::new("1.0.0").unwrap();
    let conf = node.plugin_conf().to_string();
    for netns in ["", "/var/run/netns/ambit-gone-ns"] {
        let out = node.invoke_plugin(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "cgone"),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
            ],
            conf.as_bytes(),
        );
        assert!(
            out.status.success(),
            "DEL netns={netns:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.stdout.is_empty());
    }
    node.start_agent().unwrap();
    let out = node.invoke_plugin(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "cgone"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
        ],
        conf.as_bytes(),
    );
    assert!(out.status.success());
}

#[test]
fn excluded_and_opted_out_pods_pass_through_uncaptured() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let cases = [
        (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
            None,
        ),
        (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ambit-system;K8S_POD_NAME=ambit-agent-x",
            None,
        ),
        (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=optout",
            Some("disabled"),
        ),
    ];
    for (i, (args, ann)) in cases.iter().enumerate() {
        let ns = NsGuard::new(unique("ap")).unwrap();
        let mut cmd_env = vec![];
        if let Some(v) = ann {
            cmd_env.push(
                serde_json::json!({"io.kubernetes.cri.pod-annotations": {"ambit.dev/capture": v}})
                    .to_string(),
            );
        }
        let cap = cmd_env.first().cloned().unwrap_or_default();
        let id = format!("cskip{i}");
        let out = node.cnitool_with("add", &ns, &id, args, &[("CAP_ARGS", &cap)]);
        assert!(
            out.status.success(),
            "{args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !ns.exec(&["nft", "list", "ruleset"])
                .unwrap()
                .contains("ambit"),
            "{args} was captured"
        );
    }
    assert!(node.recorded_pods().is_empty());
}

#[test]
fn host_network_namespace_is_never_captured() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let mut conf = node.plugin_conf();
    conf["prevResult"] = serde_json::json!({"cniVersion": "1.0.0", "ips": []});
    // The plugin runs in the node's namespace; a "pod" whose namespace is that same one is a
    // host-network pod: passed through, and the node's own namespace is left untouched.
    let node_ns = node.ns.path();
    let out = node.invoke_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "chostnet"),
            ("CNI_NETNS", node_ns.to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=hostnet",
            ),
        ],
        conf.to_string().as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, conf["prevResult"]);
    assert!(
        !node
            .ns
            .exec(&["nft", "list", "ruleset"])
            .unwrap()
            .contains("ambit")
    );
    assert!(node.recorded_pods().is_empty());
    assert!(
        node.cni_log().contains("host-network pod"),
        "{}",
        node.cni_log()
    );
}

#[test]
fn a_symlink_in_place_of_the_log_file_is_not_followed_and_add_still_works() {
    let scratch = TempDir::new("cnilog");
    let victim = scratch.0.join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    let link = scratch.0.join("ambit-cni.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let mut node = Node::with_plugin_conf(
        "1.0.0",
        serde_json::json!({"logFile": link, "logLevel": "debug"}),
    )
    .unwrap();
    node.start_agent().unwrap();
    let pod_ns = NsGuard::new(unique("ap")).unwrap();
    let args =
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=linked;K8S_POD_UID=uid-linked";
    let out = node.cnitool("add", &pod_ns, "clinked", args);
    assert!(
        out.status.success(),
        "ADD must work without its log file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "untouched",
        "the link's target was written"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("logFile not used") && stderr.contains("is a symbolic link"),
        "the plugin must say why it does not log to the file: {stderr}"
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let out = node.cnitool("del", &pod_ns, "clinked", args);
    assert!(out.status.success());
}

#[test]
fn add_into_a_namespace_with_loopback_down_brings_it_up() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    // `ip netns add` leaves loopback down (the CNI walkthrough's own steps).
    let c = NsGuard::new(unique("ap")).unwrap();
    c.exec(&["ip", "link", "set", "lo", "down"]).unwrap();
    let out = node.cnitool(
        "add",
        &c,
        "lodown1",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=lodown",
    );
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.cni_log()
    );
    let lo = c.exec(&["ip", "-o", "link", "show", "lo"]).unwrap();
    assert!(lo.contains(",UP"), "{lo}");
    assert!(
        c.exec(&["nft", "list", "table", "inet", "ambit"])
            .unwrap()
            .contains("redirect to :15001")
    );
    let del = node.cnitool(
        "del",
        &c,
        "lodown1",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=lodown",
    );
    assert!(del.status.success());
}
