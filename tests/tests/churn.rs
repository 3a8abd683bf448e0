//! Tier "churn": 250 pods on one node created and deleted through libcni, several at a time,
//! the way a busy node sees them. Every ADD captures (rules in the pod, a record, listeners),
//! every DEL releases, and the agent's state agrees afterwards: no record, no pod counted, no
//! pod in its dump. The agent's RSS with 250 captured pods is reported.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ambit_tests::*;

const PODS: usize = 250;
const PARALLEL: usize = 4;

fn captured(node: &Node) -> f64 {
    metric(&node.scrape("/metrics", 15020), "ambit_pods_captured", &[]).unwrap_or(-1.0)
}

#[test]
fn two_hundred_fifty_pods_come_and_go_through_libcni_and_the_agent_state_agrees() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let rss_idle = node.agent_rss_kib().unwrap();
    let namespaces: Vec<NsGuard> = (0..PODS)
        .map(|_| NsGuard::new(unique("ap")).unwrap())
        .collect();
    let ids: Vec<String> = (0..PODS)
        .map(|i| format!("cchurn{i:03}{}", std::process::id()))
        .collect();
    let args = |i: usize| {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=churn;K8S_POD_NAME=p{i};K8S_POD_UID=uid-p{i}")
    };
    let run = |op: &str| {
        let next = AtomicUsize::new(0);
        let failures = std::sync::Mutex::new(Vec::new());
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..PARALLEL {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= PODS {
                            return;
                        }
                        let out = node.cnitool(op, &namespaces[i], &ids[i], &args(i));
                        if !out.status.success() {
                            failures.lock().unwrap().push(format!(
                                "{op} p{i}: {}{}",
                                String::from_utf8_lossy(&out.stdout),
                                String::from_utf8_lossy(&out.stderr)
                            ));
                        }
                    }
                });
            }
        });
        let failures = failures.into_inner().unwrap();
        assert!(
            failures.is_empty(),
            "{} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
        start.elapsed()
    };

    let add_took = run("add");
    let mut want = ids.clone();
    want.sort();
    assert_eq!(node.recorded_pods(), want, "every ADD recorded");
    assert_eq!(captured(&node), PODS as f64);
    for i in [0, PODS / 2, PODS - 1] {
        let rules = run_ok(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &namespaces[i].name,
            "nft",
            "list",
            "ruleset",
        ]))
        .unwrap();
        assert!(rules.contains("redirect to :15001"), "pod {i}: {rules}");
    }
    let rss_full = node.agent_rss_kib().unwrap();
    let fds_full = std::fs::read_dir(format!("/proc/{}/fd", node.agent_pid().unwrap()))
        .unwrap()
        .count();

    let del_took = run("del");
    assert!(
        node.recorded_pods().is_empty(),
        "{:?}",
        node.recorded_pods()
    );
    assert_eq!(captured(&node), 0.0);
    let dump = node.scrape("/config_dump", 15000);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["pods"].as_array().map_or(usize::MAX, Vec::len),
        0,
        "{dump}"
    );
    let fds_after = std::fs::read_dir(format!("/proc/{}/fd", node.agent_pid().unwrap()))
        .unwrap()
        .count();
    // Rules leave with the pods' records: DEL removed them from each namespace.
    let rules = run_ok(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &namespaces[7].name,
        "nft",
        "list",
        "ruleset",
    ]))
    .unwrap();
    assert!(!rules.contains("ambit"), "{rules}");
    let log = node.agent_log();
    assert!(
        !log.contains("ERROR"),
        "{}",
        log.lines()
            .filter(|l| l.contains("ERROR"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "churn: {PODS} ADDs in {add_took:?} ({:.1} pods/s, {PARALLEL} at a time), {PODS} DELs in {del_took:?}; \
         agent RSS {rss_idle} KiB idle -> {rss_full} KiB with {PODS} pods; fds {fds_full} -> {fds_after}",
        PODS as f64 / add_took.as_secs_f64()
    );
}
