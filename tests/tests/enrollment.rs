//! Tier "enrollment": with `"enrollment": "labels"` in the plugin's conflist entry, pods are
//! captured by the label `ambit.dev/dataplane-mode` on their namespace or themselves, as the
//! agent knows the objects — here from its manifests directory, the same store the Kubernetes
//! watch feeds. A pod the agent does not know fails its ADD (the runtime retries): it never
//! starts uncaptured by mistake.

use std::path::Path;
use std::process::Command;

use ambit_tests::mesh::manifest_args;
use ambit_tests::*;

fn object(dir: &Path, file: &str, v: serde_json::Value) {
    std::fs::write(dir.join(file), serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn namespace(dir: &Path, name: &str, enrolled: bool) {
    let labels = if enrolled {
        serde_json::json!({"ambit.dev/dataplane-mode": "enabled"})
    } else {
        serde_json::json!({})
    };
    object(
        dir,
        &format!("ns-{name}.json"),
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "labels": labels}}),
    );
}

fn pod(dir: &Path, ns: &str, name: &str, mode: Option<&str>) {
    let labels = match mode {
        Some(m) => serde_json::json!({"app": name, "ambit.dev/dataplane-mode": m}),
        None => serde_json::json!({"app": name}),
    };
    object(
        dir,
        &format!("pod-{ns}-{name}.json"),
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                                        "labels": labels},
                           "spec": {"containers": [{"name": "app", "image": "busybox"}]}}),
    );
}

fn has_rules(p: &Pod) -> bool {
    run_ok(Command::new("ip").args(["netns", "exec", &p.ns.name, "nft", "list", "ruleset"]))
        .unwrap()
        .contains("redirect to :15001")
}

#[test]
fn labels_on_namespaces_and_pods_decide_capture_and_unknown_pods_wait() {
    let dir = TempDir::new("enroll");
    let m = dir.0.join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    namespace(&m, "shop", true);
    namespace(&m, "default", false);
    pod(&m, "shop", "web", None);
    pod(&m, "shop", "legacy", Some("disabled"));
    pod(&m, "default", "db", None);
    pod(&m, "default", "tool", Some("enabled"));
    let mut node =
        Node::with_plugin_conf("1.0.0", serde_json::json!({"enrollment": "labels"})).unwrap();
    node.agent_args = manifest_args(&m, "cluster.local");
    node.start_agent().unwrap();

    let web = node.add_pod_in("shop", "web").unwrap();
    let legacy = node.add_pod_in("shop", "legacy").unwrap();
    let db = node.add_pod_in("default", "db").unwrap();
    let tool = node.add_pod_in("default", "tool").unwrap();
    let mut want = vec![web.container_id.clone(), tool.container_id.clone()];
    want.sort();
    assert_eq!(node.recorded_pods(), want, "{}", node.cni_log());
    assert!(has_rules(&web) && has_rules(&tool));
    assert!(
        !has_rules(&legacy) && !has_rules(&db),
        "not enrolled: no rules"
    );
    let log = node.agent_log();
    assert!(
        log.contains("namespace label ambit.dev/dataplane-mode=enabled"),
        "{log}"
    );
    assert!(
        log.contains("pod label ambit.dev/dataplane-mode opts out"),
        "{log}"
    );

    // A pod the agent does not know (its object has not reached it): ADD fails with "try
    // again later", and nothing is left in its namespace.
    let ghost_ns = NsGuard::new(unique("ap")).unwrap();
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=ghost;K8S_POD_UID=uid-ghost";
    let out = node.cnitool("add", &ghost_ns, "cghost1", args);
    assert!(!out.status.success());
    let err =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot tell yet whether the pod is enrolled"),
        "{err}"
    );
    assert!(err.contains("shop/ghost"), "{err}");
    assert!(!node.recorded_pods().contains(&"cghost1".to_string()));
    let _ = node.cnitool("del", &ghost_ns, "cghost1", args);

    // Its object arrives: the runtime's retry captures it.
    pod(&m, "shop", "ghost", None);
    let ghost = node.add_pod_in("shop", "ghost").unwrap();
    assert!(has_rules(&ghost));
    assert!(node.recorded_pods().contains(&ghost.container_id));
}

#[test]
fn labels_mode_without_a_source_of_pods_fails_closed_with_the_fix_in_the_message() {
    let mut node =
        Node::with_plugin_conf("1.0.0", serde_json::json!({"enrollment": "labels"})).unwrap();
    node.start_agent().unwrap();
    let Err(err) = node.add_pod_in("shop", "web") else {
        panic!("ADD succeeded without any source of Pod objects");
    };
    let err = err.to_string();
    assert!(err.contains("--kubernetes or --manifests-dir"), "{err}");
    assert!(node.recorded_pods().is_empty());
}
