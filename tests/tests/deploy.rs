//! `deploy/ambit.yaml`: valid against the Kubernetes schemas (kubernetes-validate, strict,
//! oldest and newest supported versions), and consistent with what the binaries accept — the
//! agent's configuration file loads, the plugin's entry parses, and every path the
//! configuration names is inside a volume the DaemonSet mounts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ambit_tests::*;
use serde_yaml_ng::Value;

/// Oldest and newest Kubernetes versions the manifests are checked against.
const VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A Python package from PyPI, installed once under target/tools (pip --target: no venv).
fn pip_tool(spec: &str) -> PathBuf {
    let dir = repo().join("target/tools").join(spec.replace("==", "-"));
    if !dir.is_dir() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        run_ok(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(&tmp)
                .arg(spec),
        )
        .unwrap_or_else(|e| {
            panic!("installing {spec} from PyPI (python3 and pip are needed): {e}")
        });
        let _ = std::fs::rename(&tmp, &dir);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// kubernetes-validate, installed once.
fn validator() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| pip_tool(VALIDATOR))
}

fn validate(file: &Path, version: &str) -> std::process::Output {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", version])
        .arg(file)
        .env("PYTHONPATH", validator())
        .output()
        .unwrap()
}

#[test]
fn deploy_manifests_pass_strict_kubernetes_schema_validation() {
    let file = repo().join("deploy/ambit.yaml");
    for v in VERSIONS {
        let out = validate(&file, v);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "Kubernetes {v}:\n{text}");
        assert!(text.contains("daemonset/ambit-agent"), "{text}");
    }
    // The validator does reject a mistake (a misspelt field in the DaemonSet).
    let dir = TempDir::new("deploy");
    let bad = dir.0.join("bad.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&bad, text.replace("priorityClassName:", "priorityClass:")).unwrap();
    assert!(!validate(&bad, VERSIONS[1]).status.success());
}

fn docs() -> Vec<Value> {
    docs_of("deploy/ambit.yaml")
}

fn docs_of(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{kind} {name} not in deploy/ambit.yaml"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn the_deployed_configuration_is_what_the_binaries_accept_and_mount() {
    let docs = docs();
    let cm = find(&docs, "ConfigMap", "ambit-config");
    let agent_yaml = s(&cm["data"]["agent.yaml"]);
    let cni_json = s(&cm["data"]["cni.json"]);

    let dir = TempDir::new("deploy-config");
    let file = dir.0.join("agent.yaml");
    std::fs::write(&file, agent_yaml).unwrap();
    let config =
        ambit_agent::config::Config::load(["ambit-agent", "--config", file.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("agent.yaml does not load: {e}"));
    assert!(config.kubernetes);

    let mut entry: serde_json::Value = serde_json::from_str(cni_json).unwrap();
    entry["cniVersion"] = "1.0.0".into();
    entry["type"] = "ambit-cni".into();
    entry["name"] = "ambit-cni".into();
    let conf = ambit_cni::config::NetConf::parse(entry.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("cni.json does not parse: {e:?}"));
    assert_eq!(
        conf.agent_socket, config.socket,
        "plugin and agent use one socket"
    );
    assert_eq!(conf.enrollment, ambit_cni::config::EnrollmentMode::Labels);

    // Every path named must sit inside a volume the container mounts.
    let ds = find(&docs, "DaemonSet", "ambit-agent");
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    let mounts = |name: &str| -> Vec<String> {
        let c = containers
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap();
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| s(&m["mountPath"]).to_string())
            .collect()
    };
    let inside = |container: &str, path: &Path| {
        assert!(
            mounts(container).iter().any(|m| path.starts_with(m)),
            "{container}: {} is not inside any of {:?}",
            path.display(),
            mounts(container)
        )
    };
    let agent = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("agent"))
        .unwrap();
    let command: Vec<&str> = agent["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    let config_path = command[command.iter().position(|a| *a == "--config").unwrap() + 1];
    inside("agent", Path::new(config_path));
    inside("agent", config.ca_cert.as_deref().unwrap());
    inside("agent", config.ca_key.as_deref().unwrap());
    inside("agent", &config.socket);
    inside("agent", &config.state_dir);
    // The installer runs apart (its own DaemonSet and service account).
    let install_ds = find(&docs, "DaemonSet", "ambit-install");
    assert_eq!(
        s(&install_ds["spec"]["template"]["spec"]["serviceAccountName"]),
        "ambit-install"
    );
    assert_eq!(
        s(&ds["spec"]["template"]["spec"]["serviceAccountName"]),
        "ambit-agent"
    );
    let install_containers = install_ds["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    let installer = install_containers
        .iter()
        .find(|c| c["name"].as_str() == Some("install-cni"))
        .unwrap();
    let installer_mounts: Vec<String> = installer["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| s(&m["mountPath"]).to_string())
        .collect();
    let inside_installer = |path: &Path| {
        assert!(
            installer_mounts.iter().any(|m| path.starts_with(m)),
            "install-cni: {} is not inside any of {installer_mounts:?}",
            path.display()
        )
    };
    let env = |k: &str| {
        installer["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some(k))
            .map(|e| s(&e["value"]).to_string())
            .unwrap_or_else(|| panic!("install-cni has no {k}"))
    };
    inside_installer(Path::new(
        env("AMBIT_PLUGIN_CONFIG").trim_start_matches('@'),
    ));
    inside_installer(Path::new(&env("AMBIT_CNI_CONF_DIR")));
    inside_installer(Path::new(&env("AMBIT_CNI_BIN_DIR")));
    // It decides uninstall vs upgrade by its own DaemonSet.
    assert_eq!(env("AMBIT_DAEMONSET"), "ambit-system/ambit-install");
    // The plugin skips the agent's own pods: the DaemonSet's pods match what it skips.
    assert_eq!(s(&ds["metadata"]["namespace"]), conf.agent_namespace);
    assert!(format!("{}-", s(&ds["metadata"]["name"])).starts_with(&conf.agent_pod_prefix));
}

/// The agent's ClusterRole grants exactly what it uses: reads of what it watches (Pods,
/// Namespaces, Services, EndpointSlices, the two Istio policy kinds) and the one patch of
/// the redirection annotation; nothing else (no Secrets, no writes to specs).
#[test]
fn the_agent_s_cluster_role_grants_exactly_what_it_watches_and_patches() {
    let docs = docs();
    let role = find(&docs, "ClusterRole", "ambit-agent");
    let mut granted: Vec<String> = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let list = |k: &str| -> Vec<&str> {
            rule[k]
                .as_sequence()
                .map(|v| v.iter().map(s).collect())
                .unwrap_or_default()
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    granted.push(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    granted.sort();
    let mut want: Vec<String> = [
        "/pods:get",
        "/pods:list",
        "/pods:watch",
        "/namespaces:get",
        "/namespaces:list",
        "/namespaces:watch",
        "/pods/status:patch",
        "/services:list",
        "/services:watch",
        "discovery.k8s.io/endpointslices:list",
        "discovery.k8s.io/endpointslices:watch",
        "security.istio.io/authorizationpolicies:get",
        "security.istio.io/authorizationpolicies:list",
        "security.istio.io/authorizationpolicies:watch",
        "security.istio.io/peerauthentications:get",
        "security.istio.io/peerauthentications:list",
        "security.istio.io/peerauthentications:watch",
    ]
    .map(String::from)
    .to_vec();
    want.sort();
    assert_eq!(granted, want);
}

/// `deploy/node-scope.yaml`: valid for the Kubernetes versions that have
/// ValidatingAdmissionPolicy v1, and its CEL, evaluated (cel-python) on the requests it
/// judges, lets an agent change its own node and its own node's pods only.
#[test]
fn the_node_scope_policy_limits_each_agent_to_its_own_node() {
    let file = repo().join("deploy/node-scope.yaml");
    for v in ["1.30.0", VERSIONS[1]] {
        let out = validate(&file, v);
        assert!(
            out.status.success(),
            "Kubernetes {v}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let docs = docs_of("deploy/node-scope.yaml");
    let policy = find(&docs, "ValidatingAdmissionPolicy", "ambit-agent-own-node");
    let binding = find(
        &docs,
        "ValidatingAdmissionPolicyBinding",
        "ambit-agent-own-node",
    );
    assert_eq!(s(&binding["spec"]["policyName"]), "ambit-agent-own-node");
    assert_eq!(s(&binding["spec"]["validationActions"][0]), "Deny");
    let spec = &policy["spec"];
    assert_eq!(s(&spec["failurePolicy"]), "Fail");
    let exprs = serde_json::json!({
        "match": s(&spec["matchConditions"][0]["expression"]),
        "node": s(&spec["variables"][0]["expression"]),
        "valid": s(&spec["validations"][0]["expression"]),
    });
    let agent = "system:serviceaccount:ambit-system:ambit-agent";
    let install = "system:serviceaccount:ambit-system:ambit-install";
    let request = |user: &str, node: Option<&str>, resource: &str| {
        let extra = match node {
            Some(n) => serde_json::json!({"authentication.kubernetes.io/node-name": [n]}),
            None => serde_json::json!({}),
        };
        serde_json::json!({"userInfo": {"username": user, "extra": extra},
                           "resource": {"group": "", "version": "v1", "resource": resource}})
    };
    let pod_on = |n: &str| serde_json::json!({"metadata": {"name": "p"}, "spec": {"nodeName": n}});
    let node_named = |n: &str| serde_json::json!({"metadata": {"name": n}, "spec": {}});
    // (case, request, object, judged by the policy, allowed)
    let cases = serde_json::json!([
        [
            "own pod",
            request(agent, Some("n1"), "pods"),
            pod_on("n1"),
            true,
            true
        ],
        [
            "another node's pod",
            request(agent, Some("n1"), "pods"),
            pod_on("n2"),
            true,
            false
        ],
        [
            "own node",
            request(agent, Some("n1"), "nodes"),
            node_named("n1"),
            true,
            true
        ],
        [
            "another node",
            request(agent, Some("n1"), "nodes"),
            node_named("n2"),
            true,
            false
        ],
        [
            "token without node",
            request(agent, None, "pods"),
            pod_on("n1"),
            true,
            false
        ],
        [
            "pod of no node yet",
            request(agent, Some("n1"), "pods"),
            pod_on(""),
            true,
            false
        ],
        [
            "someone else",
            request("system:serviceaccount:kube-system:x", Some("n1"), "pods"),
            pod_on("n2"),
            false,
            true
        ],
        [
            "installer, own node",
            request(install, Some("n1"), "nodes"),
            node_named("n1"),
            true,
            true
        ],
        [
            "installer, another node",
            request(install, Some("n1"), "nodes"),
            node_named("n2"),
            true,
            false
        ],
    ]);
    let script = r#"
import json, sys, celpy
exprs, cases = json.load(sys.stdin)
env = celpy.Environment()
prog = {k: env.program(env.compile(v)) for k, v in exprs.items()}
out = []
for name, request, obj, _, _ in cases:
    act = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(obj)}
    judged = bool(prog["match"].evaluate(act))
    act["variables"] = celpy.json_to_cel({"node": str(prog["node"].evaluate(act))})
    allowed = (not judged) or bool(prog["valid"].evaluate(act))
    out.append([name, judged, allowed])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .env("PYTHONPATH", pip_tool("cel-python==0.2.0"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::json!([exprs, cases]).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "CEL evaluation failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<(String, bool, bool)> = serde_json::from_slice(&out.stdout).unwrap();
    for (case, result) in cases.as_array().unwrap().iter().zip(&got) {
        assert_eq!(
            (result.1, result.2),
            (case[3].as_bool().unwrap(), case[4].as_bool().unwrap()),
            "{}: (judged, allowed)",
            result.0
        );
    }
    assert_eq!(got.len(), 9);
}
