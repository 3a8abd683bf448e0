use super::*;

fn conf(extra: &str) -> NetConf {
    let json = format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"ambit-cni"{extra}}}"#);
    NetConf::parse(json.as_bytes()).unwrap()
}

fn pod(ns: Option<&str>, name: Option<&str>) -> PodArgs {
    PodArgs {
        namespace: ns.map(String::from),
        name: name.map(String::from),
        uid: None,
    }
}

fn ann(v: &str) -> BTreeMap<String, String> {
    [(CAPTURE_ANNOTATION.to_string(), v.to_string())].into()
}

/// Without settings the plugin reaches the agent's own default socket, and lets through the
/// probe sources ARCHITECTURE.md names (the addresses the node SNATs kubelet probes to).
#[test]
fn without_settings_the_plugin_finds_the_agent_and_the_documented_probe_sources() {
    let c = conf("");
    assert_eq!(
        c.agent_socket,
        PathBuf::from(ambit_common::DEFAULT_AGENT_SOCKET)
    );
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md"))
        .unwrap();
    let row = doc
        .lines()
        .find(|l| l.starts_with("| probe sources |"))
        .expect("ARCHITECTURE.md's probe sources row");
    let documented: Vec<IpAddr> = row
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|a| a.parse().unwrap())
        .collect();
    let defaults: Vec<IpAddr> = c
        .probe_v4()
        .into_iter()
        .map(IpAddr::V4)
        .chain(c.probe_v6().into_iter().map(IpAddr::V6))
        .collect();
    assert_eq!(defaults, documented);
}

#[test]
fn parse_errors_carry_the_spec_codes() {
    let cases: &[(&str, u32)] = &[
        ("{not json", code::DECODE),
        ("", code::DECODE),
        (r#"{"cniVersion": 5}"#, code::INVALID_CONFIG),
        (r#"{"name":"x"}"#, code::INVALID_CONFIG),
        (r#"{"cniVersion":"0.2.0"}"#, code::INCOMPATIBLE_VERSION),
        (r#"{"cniVersion":"9.9.9"}"#, code::INCOMPATIBLE_VERSION),
        (
            r#"{"cniVersion":"1.0.0","agentTimeoutSeconds":0}"#,
            code::INVALID_CONFIG,
        ),
        (
            r#"{"cniVersion":"1.0.0","agentTimeoutSeconds":-1}"#,
            code::INVALID_CONFIG,
        ),
        (
            r#"{"cniVersion":"1.0.0","logLevel":"loud"}"#,
            code::INVALID_CONFIG,
        ),
        (
            r#"{"cniVersion":"1.0.0","nonKubernetes":"maybe"}"#,
            code::INVALID_CONFIG,
        ),
        (
            r#"{"cniVersion":"1.0.0","probeSources":["nope"]}"#,
            code::INVALID_CONFIG,
        ),
    ];
    for (input, want) in cases {
        let err = NetConf::parse(input.as_bytes()).unwrap_err();
        assert_eq!(err.code, *want, "input {input:?}: {err:?}");
        assert!(!err.details.is_empty());
    }
}

#[test]
fn every_supported_version_parses() {
    for v in SUPPORTED_VERSIONS {
        let c = NetConf::parse(format!(r#"{{"cniVersion":"{v}"}}"#).as_bytes()).unwrap();
        assert_eq!(c.cni_version, v);
    }
}

#[test]
fn prev_result_ips_and_errors() {
    let c = conf(
        r#","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"},{"address":"fd00::5/64"}]}"#,
    );
    assert_eq!(
        c.prev_result_ips().unwrap(),
        vec![
            "10.1.0.5".parse::<IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    // 0.3.x/0.4.0 results carry "version" in each ip; still parsed.
    let c = conf(r#","prevResult":{"ips":[{"version":"4","address":"10.1.0.6/24"}]}"#);
    assert_eq!(c.prev_result_ips().unwrap().len(), 1);
    for bad in [
        "",
        r#","prevResult":"garbage""#,
        r#","prevResult":{"ips":"x"}"#,
        r#","prevResult":{"ips":[{"gateway":"10.0.0.1"}]}"#,
        r#","prevResult":{"ips":[{"address":"10.1.0.999/24"}]}"#,
    ] {
        let err = conf(bad).prev_result_ips().unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG, "{bad}");
    }
}

#[test]
fn result_is_prev_result_unchanged_in_requested_version() {
    let c = NetConf::parse(
        br#"{"cniVersion":"0.4.0","prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.1.0.5/24","interface":0}],"dns":{}}}"#,
    )
    .unwrap();
    let out = serde_json::to_string(&c.result()).unwrap();
    assert_eq!(
        out,
        r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.1.0.5/24","interface":0}],"dns":{}}"#
    );
}

#[test]
fn cni_args() {
    let env = CniEnv::from_vars([(
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u1;K8S_POD_INFRA_CONTAINER_ID=abc",
    )]);
    let args = env.args().unwrap();
    assert_eq!(
        PodArgs::from_args(&args),
        PodArgs {
            namespace: Some("default".into()),
            name: Some("web-0".into()),
            uid: Some("u1".into())
        }
    );
    for bad in ["novalue", "A=1;junk", "=x"] {
        let env = CniEnv::from_vars([("CNI_ARGS", bad)]);
        assert_eq!(env.args().unwrap_err().code, code::INVALID_ENV, "{bad}");
    }
    assert!(
        CniEnv::from_vars([("CNI_ARGS", "")])
            .args()
            .unwrap()
            .is_empty()
    );
    assert!(CniEnv::from_vars([("CNI_ARGS", "A=1;")]).args().is_ok());
}

#[test]
fn container_id_rules() {
    for ok in ["abc", "0a-b_c.d", "f3e0c1d2"] {
        assert!(
            CniEnv::from_vars([("CNI_CONTAINERID", ok)])
                .container_id()
                .is_ok(),
            "{ok}"
        );
    }
    for bad in ["", "-abc", "a b", "a/b", "ä"] {
        let e = CniEnv::from_vars([("CNI_CONTAINERID", bad)])
            .container_id()
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV, "{bad:?}");
    }
    assert_eq!(
        CniEnv::default().container_id().unwrap_err().code,
        code::INVALID_ENV
    );
}

#[test]
fn commands() {
    for (s, c) in [
        ("ADD", Command::Add),
        ("DEL", Command::Del),
        ("CHECK", Command::Check),
        ("STATUS", Command::Status),
        ("GC", Command::Gc),
        ("VERSION", Command::Version),
    ] {
        assert_eq!(
            CniEnv::from_vars([("CNI_COMMAND", s)]).command().unwrap(),
            c
        );
    }
    assert_eq!(
        CniEnv::from_vars([("CNI_COMMAND", "add")])
            .command()
            .unwrap_err()
            .code,
        code::INVALID_ENV
    );
    assert_eq!(
        CniEnv::default().command().unwrap_err().code,
        code::INVALID_ENV
    );
}

#[test]
fn enrollment_table() {
    use Enrollment::*;
    let none = BTreeMap::new();
    let base = conf("");
    let incl = conf(r#","includeNamespaces":["apps"]"#);
    let skip_plain = conf(r#","nonKubernetes":"skip""#);
    let cases: Vec<(&NetConf, PodArgs, BTreeMap<String, String>, bool)> = vec![
        (&base, pod(Some("default"), Some("a")), none.clone(), true),
        (
            &base,
            pod(Some("kube-system"), Some("a")),
            none.clone(),
            false,
        ),
        (
            &base,
            pod(Some("kube-system"), Some("a")),
            ann("enabled"),
            true,
        ),
        (
            &base,
            pod(Some("default"), Some("a")),
            ann("disabled"),
            false,
        ),
        (&base, pod(Some("default"), Some("a")), ann("false"), false),
        (&base, pod(Some("default"), Some("a")), ann("bogus"), true),
        (
            &base,
            pod(Some("ambit-system"), Some("ambit-agent-x1")),
            none.clone(),
            false,
        ),
        // The agent's own pod is never captured, even when annotated.
        (
            &base,
            pod(Some("ambit-system"), Some("ambit-agent-x1")),
            ann("enabled"),
            false,
        ),
        (
            &base,
            pod(Some("ambit-system"), Some("other")),
            none.clone(),
            true,
        ),
        (&incl, pod(Some("apps"), Some("a")), none.clone(), true),
        (&incl, pod(Some("default"), Some("a")), none.clone(), false),
        (&incl, pod(Some("default"), Some("a")), ann("true"), true),
        (&base, pod(None, Some("podman-ctr")), none.clone(), true),
        (
            &skip_plain,
            pod(None, Some("podman-ctr")),
            none.clone(),
            false,
        ),
        (&skip_plain, pod(None, None), ann("enabled"), true),
    ];
    for (i, (c, p, a, want)) in cases.into_iter().enumerate() {
        let got = enrollment(c, &p, &a);
        assert_eq!(
            matches!(got, Capture(_)),
            want,
            "case {i}: {p:?} {a:?} -> {got:?}"
        );
    }
}

#[test]
fn labels_mode_asks_the_agent_only_where_the_labels_decide() {
    let labels = conf(r#","enrollment":"labels""#);
    let none = BTreeMap::new();
    let got = |p: PodArgs, a: &BTreeMap<String, String>| enrollment(&labels, &p, a);
    assert_eq!(
        got(pod(Some("default"), Some("a")), &none),
        Enrollment::Undecided
    );
    assert!(matches!(
        got(pod(Some("kube-system"), Some("a")), &none),
        Enrollment::Skip(_)
    ));
    assert!(matches!(
        got(pod(Some("default"), Some("a")), &ann("enabled")),
        Enrollment::Capture(_)
    ));
    assert!(matches!(
        got(pod(Some("default"), Some("a")), &ann("disabled")),
        Enrollment::Skip(_)
    ));
    assert!(matches!(
        got(pod(Some("ambit-system"), Some("ambit-agent-1")), &none),
        Enrollment::Skip(_)
    ));
    assert!(matches!(
        got(pod(None, Some("podman-ctr")), &none),
        Enrollment::Capture(_)
    ));
    assert_eq!(base_mode(), EnrollmentMode::All);
    let bad = NetConf::parse(
        br#"{"cniVersion":"1.0.0","name":"n","type":"ambit-cni","enrollment":"maybe"}"#,
    )
    .unwrap_err();
    assert_eq!(bad.code, crate::error::code::INVALID_CONFIG, "{bad:?}");
}

fn base_mode() -> EnrollmentMode {
    conf("").enrollment
}

#[test]
fn pod_annotations_from_runtime_config() {
    let c = conf(
        r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"ambit.dev/capture":"disabled","n":"1"}}"#,
    );
    let a = c.pod_annotations();
    assert_eq!(
        a.get(CAPTURE_ANNOTATION).map(String::as_str),
        Some("disabled")
    );
    assert_eq!(a.len(), 2);
    assert!(conf("").pod_annotations().is_empty());
}

mod fuzz {
    use super::*;
    use ambit_common::testing::{json, text};
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "cniVersion",
        "name",
        "type",
        "agentSocket",
        "agentTimeoutSeconds",
        "excludeNamespaces",
        "includeNamespaces",
        "enrollment",
        "nonKubernetes",
        "probeSources",
        "prevResult",
        "ips",
        "address",
        "interfaces",
        "runtimeConfig",
        "io.kubernetes.cri.pod-annotations",
        "ambit.dev/capture",
        "logLevel",
        "logStderr",
        "cni.dev/valid-attachments",
        "containerID",
        "ifname",
        "1.0.0",
        "1.1.0",
        "0.3.1",
    ];

    proptest! {
        /// Whatever a runtime pipes in: parsed and validated, or refused with a CNI error in
        /// the configuration/decoding range — never a panic.
        #[test]
        fn fuzz_network_configurations(v in json(KEYS), raw in proptest::collection::vec(any::<u8>(), 0..128)) {
            for bytes in [serde_json::to_vec(&v).unwrap(), raw.clone()] {
                match NetConf::parse(&bytes) {
                    Ok(c) => {
                        let _ = c.prev_result_ips();
                        let _ = c.pod_annotations();
                        let _ = c.result();
                        let _ = enrollment(&c, &PodArgs::default(), &c.pod_annotations());
                    }
                    Err(e) => prop_assert!(
                        [crate::error::code::INCOMPATIBLE_VERSION, crate::error::code::DECODE, crate::error::code::INVALID_CONFIG]
                            .contains(&e.code),
                        "unexpected code {} for {:?}", e.code, String::from_utf8_lossy(&bytes)
                    ),
                }
            }
        }

        #[test]
        fn fuzz_environment(cmd in text(), id in text(), args in text(), netns in text()) {
            let env = CniEnv::from_vars([
                ("CNI_COMMAND", cmd.as_str()),
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_ARGS", args.as_str()),
                ("CNI_NETNS", netns.as_str()),
            ]);
            let _ = env.command();
            let _ = env.container_id();
            let _ = env.ifname();
            if let Ok(a) = env.args() {
                let _ = PodArgs::from_args(&a);
            }
        }
    }
}
