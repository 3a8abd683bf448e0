//! The semantics table: every row is manifests + one connection + the expected decision.

use std::collections::BTreeMap;
use std::sync::Arc;

use ambit_proxy::authz::{self, Connection};
use ambit_proxy::identity::Identity;
use serde::Deserialize;

use super::*;

const ROOT: &str = "istio-system";

fn compile(yaml: &str) -> (Vec<Arc<Policy>>, Vec<PeerAuthentication>, Vec<Status>) {
    let (mut pols, mut pas, mut st) = (Vec::new(), Vec::new(), Vec::new());
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = Yaml::deserialize(doc).expect("test YAML parses");
        if v.is_null() {
            continue;
        }
        match v.get("kind").and_then(Yaml::as_str) {
            Some("PeerAuthentication") => {
                let (pa, s) = peer_authentication(&v, ROOT);
                pas.push(pa);
                st.push(s);
            }
            _ => {
                let (p, s) = authorization_policy(&v, ROOT);
                pols.extend(p.map(Arc::new));
                st.push(s);
            }
        }
    }
    (pols, pas, st)
}

/// A connection to `ns` workload with labels `app=<app>`.
struct Case {
    name: &'static str,
    yaml: String,
    dst_ns: &'static str,
    app: &'static str,
    src: Option<&'static str>,
    src_ip: &'static str,
    dst_port: u16,
    allow: bool,
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    let spec = spec
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n"
    )
}

fn pa(ns: &str, name: &str, created: &str, spec: &str) -> String {
    let spec = spec
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{created}\"\nspec:\n{spec}\n"
    )
}

const PP: Option<&str> = Some("spiffe://cluster1/ns/default/sa/productpage");
const RV: Option<&str> = Some("spiffe://cluster1/ns/default/sa/reviews");
const BLOCKED: Option<&str> = Some("spiffe://cluster1/ns/blocked/sa/default");
const PLAIN: Option<&str> = None;

fn case(
    name: &'static str,
    yaml: String,
    src: Option<&'static str>,
    dst_port: u16,
    allow: bool,
) -> Case {
    Case {
        name,
        yaml,
        dst_ns: "default",
        app: "ratings",
        src,
        src_ip: "10.0.0.5",
        dst_port,
        allow,
    }
}

fn mission() -> String {
    ap(
        "default",
        "ratings-viewer",
        "selector:\n  matchLabels:\n    app: ratings\naction: ALLOW\nrules:\n- from:\n  - source:\n      principals:\n      - cluster1/ns/default/sa/productpage",
    )
}

fn from_source(field: &str, values: &str) -> String {
    format!("rules:\n- from:\n  - source:\n      {field}: {values}")
}

fn cases() -> Vec<Case> {
    let allow_all = ap("default", "all", "rules:\n- {}");
    let mut v = vec![
        case("no policy allows", String::new(), PP, 9080, true),
        case(
            "no policy allows plaintext",
            String::new(),
            PLAIN,
            9080,
            true,
        ),
        case(
            "spec {} ALLOW denies all",
            ap("default", "x", "{}"),
            PP,
            9080,
            false,
        ),
        case(
            "spec {} DENY is a no-op",
            ap("default", "x", "action: DENY"),
            PP,
            9080,
            true,
        ),
        case(
            "rules [{}] ALLOW matches all",
            allow_all.clone(),
            PP,
            9080,
            true,
        ),
        case(
            "rules [{}] ALLOW matches plaintext",
            allow_all.clone(),
            PLAIN,
            9080,
            true,
        ),
        case(
            "rules [{}] DENY denies all",
            ap("default", "x", "action: DENY\nrules:\n- {}"),
            PP,
            9080,
            false,
        ),
        case("mission: productpage allowed", mission(), PP, 9080, true),
        case("mission: reviews refused", mission(), RV, 9080, false),
        case("mission: plaintext refused", mission(), PLAIN, 9080, false),
        case(
            "principal prefix",
            ap(
                "default",
                "x",
                &from_source("principals", "[\"cluster1/ns/default/*\"]"),
            ),
            PP,
            1,
            true,
        ),
        case(
            "principal prefix miss",
            ap(
                "default",
                "x",
                &from_source("principals", "[\"cluster1/ns/other/*\"]"),
            ),
            PP,
            1,
            false,
        ),
        case(
            "principal suffix",
            ap(
                "default",
                "x",
                &from_source("principals", "[\"*/sa/productpage\"]"),
            ),
            PP,
            1,
            true,
        ),
        case(
            "principal suffix miss",
            ap(
                "default",
                "x",
                &from_source("principals", "[\"*/sa/productpage\"]"),
            ),
            RV,
            1,
            false,
        ),
        case(
            "principal presence, mTLS",
            ap("default", "x", &from_source("principals", "[\"*\"]")),
            RV,
            1,
            true,
        ),
        case(
            "principal presence, plaintext",
            ap("default", "x", &from_source("principals", "[\"*\"]")),
            PLAIN,
            1,
            false,
        ),
        case(
            "principal of another trust domain",
            ap(
                "default",
                "x",
                &from_source("principals", "[\"other/ns/default/sa/productpage\"]"),
            ),
            PP,
            1,
            false,
        ),
        case(
            "notPrincipals excludes",
            ap(
                "default",
                "x",
                &from_source("notPrincipals", "[\"cluster1/ns/default/sa/productpage\"]"),
            ),
            PP,
            1,
            false,
        ),
        case(
            "notPrincipals admits others",
            ap(
                "default",
                "x",
                &from_source("notPrincipals", "[\"cluster1/ns/default/sa/productpage\"]"),
            ),
            RV,
            1,
            true,
        ),
        case(
            "notPrincipals admits plaintext",
            ap(
                "default",
                "x",
                &from_source("notPrincipals", "[\"cluster1/ns/default/sa/productpage\"]"),
            ),
            PLAIN,
            1,
            true,
        ),
        case(
            "namespaces match",
            ap("default", "x", &from_source("namespaces", "[default]")),
            PP,
            1,
            true,
        ),
        case(
            "namespaces miss",
            ap("default", "x", &from_source("namespaces", "[other]")),
            PP,
            1,
            false,
        ),
        case(
            "namespaces prefix",
            ap("default", "x", &from_source("namespaces", "[\"def*\"]")),
            PP,
            1,
            true,
        ),
        case(
            "namespaces never match plaintext",
            ap("default", "x", &from_source("namespaces", "[\"*\"]")),
            PLAIN,
            1,
            false,
        ),
        case(
            "notNamespaces",
            ap("default", "x", &from_source("notNamespaces", "[blocked]")),
            BLOCKED,
            1,
            false,
        ),
        case(
            "notNamespaces admits",
            ap("default", "x", &from_source("notNamespaces", "[blocked]")),
            PP,
            1,
            true,
        ),
        case(
            "serviceAccounts in the policy's namespace",
            ap(
                "default",
                "x",
                &from_source("serviceAccounts", "[productpage]"),
            ),
            PP,
            1,
            true,
        ),
        case(
            "serviceAccounts with namespace",
            ap(
                "default",
                "x",
                &from_source("serviceAccounts", "[\"default/productpage\"]"),
            ),
            PP,
            1,
            true,
        ),
        case(
            "serviceAccounts other namespace",
            ap(
                "default",
                "x",
                &from_source("serviceAccounts", "[\"other/productpage\"]"),
            ),
            PP,
            1,
            false,
        ),
        case(
            "serviceAccounts match exactly: a trailing * is no prefix",
            ap(
                "default",
                "x",
                &from_source("serviceAccounts", "[\"default/product*\"]"),
            ),
            PP,
            1,
            false,
        ),
        case(
            "serviceAccounts match exactly: * alone is no presence match",
            ap("default", "x", &from_source("serviceAccounts", "[\"*\"]")),
            PP,
            1,
            false,
        ),
        case(
            "notServiceAccounts",
            ap(
                "default",
                "x",
                &from_source("notServiceAccounts", "[reviews]"),
            ),
            RV,
            1,
            false,
        ),
        case(
            "ipBlocks CIDR",
            ap(
                "default",
                "x",
                &from_source("ipBlocks", "[\"10.0.0.0/24\"]"),
            ),
            PLAIN,
            1,
            true,
        ),
        case(
            "ipBlocks CIDR miss",
            ap(
                "default",
                "x",
                &from_source("ipBlocks", "[\"10.0.1.0/24\"]"),
            ),
            PLAIN,
            1,
            false,
        ),
        case(
            "ipBlocks single address",
            ap("default", "x", &from_source("ipBlocks", "[\"10.0.0.5\"]")),
            PLAIN,
            1,
            true,
        ),
        case(
            "ipBlocks host bits are ignored",
            ap(
                "default",
                "x",
                &from_source("ipBlocks", "[\"10.0.0.77/24\"]"),
            ),
            PLAIN,
            1,
            true,
        ),
        case(
            "notIpBlocks",
            ap(
                "default",
                "x",
                &from_source("notIpBlocks", "[\"10.0.0.0/8\"]"),
            ),
            PP,
            1,
            false,
        ),
        case(
            "to ports match",
            ap(
                "default",
                "x",
                "rules:\n- to:\n  - operation:\n      ports: [\"9080\"]",
            ),
            PP,
            9080,
            true,
        ),
        case(
            "to ports miss",
            ap(
                "default",
                "x",
                "rules:\n- to:\n  - operation:\n      ports: [\"9080\"]",
            ),
            PP,
            80,
            false,
        ),
        case(
            "to notPorts",
            ap(
                "default",
                "x",
                "rules:\n- to:\n  - operation:\n      notPorts: [\"9080\"]",
            ),
            PP,
            9080,
            false,
        ),
        case(
            "to notPorts admits others",
            ap(
                "default",
                "x",
                "rules:\n- to:\n  - operation:\n      notPorts: [\"9080\"]",
            ),
            PP,
            80,
            true,
        ),
        case(
            "from AND to: both hold",
            ap(
                "default",
                "x",
                "rules:\n- from:\n  - source:\n      principals: [\"*/sa/productpage\"]\n  to:\n  - operation:\n      ports: [\"9080\"]",
            ),
            PP,
            9080,
            true,
        ),
        case(
            "from AND to: port fails",
            ap(
                "default",
                "x",
                "rules:\n- from:\n  - source:\n      principals: [\"*/sa/productpage\"]\n  to:\n  - operation:\n      ports: [\"9080\"]",
            ),
            PP,
            80,
            false,
        ),
        case(
            "from entries are OR",
            ap(
                "default",
                "x",
                "rules:\n- from:\n  - source:\n      principals: [\"*/sa/productpage\"]\n  - source:\n      principals: [\"*/sa/reviews\"]",
            ),
            RV,
            1,
            true,
        ),
        case(
            "fields of one source are AND",
            ap(
                "default",
                "x",
                "rules:\n- from:\n  - source:\n      principals: [\"*/sa/productpage\"]\n      ipBlocks: [\"192.168.0.0/16\"]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "rules are OR",
            ap(
                "default",
                "x",
                "rules:\n- from:\n  - source:\n      principals: [\"*/sa/nobody\"]\n- to:\n  - operation:\n      ports: [\"80\"]",
            ),
            PP,
            80,
            true,
        ),
        case(
            "when source.ip",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: source.ip\n    values: [\"10.0.0.0/16\"]",
            ),
            PLAIN,
            1,
            true,
        ),
        case(
            "when source.namespace",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: source.namespace\n    values: [blocked]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "when source.principal notValues",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: source.principal\n    notValues: [\"cluster1/ns/default/sa/reviews\"]",
            ),
            RV,
            1,
            false,
        ),
        case(
            "when destination.ip",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: destination.ip\n    values: [\"10.9.0.0/16\"]",
            ),
            PP,
            1,
            true,
        ),
        case(
            "when destination.port",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: destination.port\n    values: [\"9080\"]",
            ),
            PP,
            9080,
            true,
        ),
        case(
            "when values AND notValues",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: destination.port\n    values: [\"9080\"]\n    notValues: [\"9080\"]",
            ),
            PP,
            9080,
            false,
        ),
        case(
            "when conditions are AND",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: destination.port\n    values: [\"9080\"]\n  - key: source.namespace\n    values: [other]",
            ),
            PP,
            9080,
            false,
        ),
        case(
            "DENY before ALLOW",
            format!(
                "{allow_all}{}",
                ap(
                    "default",
                    "d",
                    &format!(
                        "action: DENY\n{}",
                        from_source("principals", "[\"*/sa/productpage\"]")
                    )
                )
            ),
            PP,
            1,
            false,
        ),
        case(
            "DENY by namespace",
            ap(
                "default",
                "d",
                &format!("action: DENY\n{}", from_source("namespaces", "[blocked]")),
            ),
            BLOCKED,
            1,
            false,
        ),
        case(
            "DENY by namespace spares others",
            ap(
                "default",
                "d",
                &format!("action: DENY\n{}", from_source("namespaces", "[blocked]")),
            ),
            PP,
            1,
            true,
        ),
        case(
            "one of two ALLOWs matches",
            format!(
                "{}{}",
                ap(
                    "default",
                    "a",
                    &from_source("principals", "[\"*/sa/nobody\"]")
                ),
                ap(
                    "default",
                    "b",
                    &from_source("principals", "[\"*/sa/reviews\"]")
                )
            ),
            RV,
            1,
            true,
        ),
        case(
            "policy of another namespace does not apply",
            ap("other", "x", "{}"),
            PP,
            1,
            true,
        ),
        case(
            "root namespace policy applies mesh-wide",
            ap(ROOT, "x", "{}"),
            PP,
            1,
            false,
        ),
        case(
            "root namespace selector applies in every namespace",
            ap(ROOT, "x", "selector:\n  matchLabels:\n    app: ratings"),
            PP,
            1,
            false,
        ),
        case(
            "root namespace selector skips other labels",
            ap(ROOT, "x", "selector:\n  matchLabels:\n    app: details"),
            PP,
            1,
            true,
        ),
        case(
            "selector label mismatch",
            ap(
                "default",
                "x",
                "selector:\n  matchLabels:\n    app: details",
            ),
            PP,
            1,
            true,
        ),
        case(
            "selector needs every label",
            ap(
                "default",
                "x",
                "selector:\n  matchLabels:\n    app: ratings\n    version: v2",
            ),
            PP,
            1,
            true,
        ),
        case(
            "ALLOW rule with methods is dropped",
            ap(
                "default",
                "x",
                "rules:\n- to:\n  - operation:\n      methods: [GET]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "ALLOW keeps its L4-only rules",
            ap(
                "default",
                "x",
                "rules:\n- to:\n  - operation:\n      methods: [GET]\n- from:\n  - source:\n      principals: [\"*/sa/productpage\"]",
            ),
            PP,
            1,
            true,
        ),
        case(
            "ALLOW rule with requestPrincipals is dropped",
            ap(
                "default",
                "x",
                "rules:\n- from:\n  - source:\n      principals: [\"*\"]\n      requestPrincipals: [\"*\"]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "ALLOW rule with an L7 when key is dropped",
            ap(
                "default",
                "x",
                "rules:\n- when:\n  - key: request.auth.claims[iss]\n    values: [x]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "DENY with only methods never matches",
            ap(
                "default",
                "x",
                "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [GET]",
            ),
            PP,
            1,
            true,
        ),
        case(
            "DENY keeps its L4 part",
            ap(
                "default",
                "x",
                "action: DENY\nrules:\n- from:\n  - source:\n      principals: [\"*/sa/productpage\"]\n      requestPrincipals: [\"*\"]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "DENY drops an L7 when (a superset)",
            ap(
                "default",
                "x",
                "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [default]\n  when:\n  - key: request.headers[x]\n    values: [y]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "an empty source never matches",
            ap("default", "x", "rules:\n- from:\n  - source: {}"),
            PP,
            1,
            false,
        ),
        case(
            "invalid ALLOW fails closed",
            ap(
                "default",
                "x",
                &from_source("ipBlocks", "[\"10.0.0.0/33\"]"),
            ),
            PP,
            1,
            false,
        ),
        case(
            "invalid ALLOW does not undo another ALLOW",
            format!(
                "{allow_all}{}",
                ap("default", "x", &from_source("ipBlocks", "[\"bad\"]"))
            ),
            PP,
            1,
            true,
        ),
        case(
            "invalid DENY denies its scope",
            ap(
                "default",
                "x",
                "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"http\"]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "invalid DENY stays in its scope",
            ap(
                "other",
                "x",
                "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"70000\"]",
            ),
            PP,
            1,
            true,
        ),
        case(
            "unknown action fails closed",
            ap("default", "x", "action: MAYBE"),
            PP,
            1,
            false,
        ),
        case(
            "CUSTOM fails closed",
            ap(
                "default",
                "x",
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- {}",
            ),
            PP,
            1,
            false,
        ),
        case(
            "AUDIT has no effect",
            ap("default", "x", "action: AUDIT\nrules:\n- {}"),
            PP,
            1,
            true,
        ),
        case(
            "waypoint policy is not enforced here",
            ap(
                "default",
                "x",
                "targetRefs:\n- kind: Service\n  name: ratings\nrules:\n- from:\n  - source:\n      principals: [\"*/sa/nobody\"]",
            ),
            PP,
            1,
            true,
        ),
        case(
            "unknown rule field rejects (fail closed)",
            ap(
                "default",
                "x",
                "rules:\n- form:\n  - source:\n      principals: [\"*\"]",
            ),
            PP,
            1,
            false,
        ),
        case(
            "unreadable selector widens the closed scope",
            ap(
                "default",
                "x",
                "action: DENY\nselector:\n  matchLabel:\n    app: details\nrules:\n- {}",
            ),
            PP,
            1,
            false,
        ),
        case(
            "v1beta1 is accepted",
            ap("default", "x", "{}")
                .replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n"),
            PP,
            1,
            false,
        ),
        case(
            "unknown apiVersion rejects (ALLOW fails closed)",
            ap("default", "x", "rules:\n- {}")
                .replace("security.istio.io/v1\n", "security.istio.io/v2\n"),
            PP,
            1,
            false,
        ),
        case(
            "STRICT mesh refuses plaintext",
            pa(ROOT, "m", "1", "mtls:\n  mode: STRICT"),
            PLAIN,
            80,
            false,
        ),
        case(
            "STRICT mesh admits mTLS",
            pa(ROOT, "m", "1", "mtls:\n  mode: STRICT"),
            PP,
            80,
            true,
        ),
        case(
            "STRICT namespace refuses plaintext",
            pa("default", "n", "1", "mtls:\n  mode: STRICT"),
            PLAIN,
            80,
            false,
        ),
        case(
            "STRICT of another namespace",
            pa("other", "n", "1", "mtls:\n  mode: STRICT"),
            PLAIN,
            80,
            true,
        ),
        case(
            "workload PERMISSIVE overrides namespace STRICT",
            format!(
                "{}{}",
                pa("default", "n", "1", "mtls:\n  mode: STRICT"),
                pa(
                    "default",
                    "w",
                    "1",
                    "selector:\n  matchLabels:\n    app: ratings\nmtls:\n  mode: PERMISSIVE"
                )
            ),
            PLAIN,
            80,
            true,
        ),
        case(
            "workload UNSET inherits namespace STRICT",
            format!(
                "{}{}",
                pa("default", "n", "1", "mtls:\n  mode: STRICT"),
                pa(
                    "default",
                    "w",
                    "1",
                    "selector:\n  matchLabels:\n    app: ratings\nmtls:\n  mode: UNSET"
                )
            ),
            PLAIN,
            80,
            false,
        ),
        case(
            "port-level PERMISSIVE exception",
            pa(
                "default",
                "w",
                "1",
                "selector:\n  matchLabels:\n    app: ratings\nmtls:\n  mode: STRICT\nportLevelMtls:\n  9090:\n    mode: PERMISSIVE",
            ),
            PLAIN,
            9090,
            true,
        ),
        case(
            "port-level exception is per port",
            pa(
                "default",
                "w",
                "1",
                "selector:\n  matchLabels:\n    app: ratings\nmtls:\n  mode: STRICT\nportLevelMtls:\n  9090:\n    mode: PERMISSIVE",
            ),
            PLAIN,
            80,
            false,
        ),
        case(
            "port-level STRICT on a PERMISSIVE workload",
            pa(
                "default",
                "w",
                "1",
                "selector:\n  matchLabels:\n    app: ratings\nportLevelMtls:\n  9090:\n    mode: STRICT",
            ),
            PLAIN,
            9090,
            false,
        ),
        case(
            "DISABLE admits plaintext",
            pa("default", "n", "1", "mtls:\n  mode: DISABLE"),
            PLAIN,
            80,
            true,
        ),
        case(
            "oldest namespace PeerAuthentication wins",
            format!(
                "{}{}",
                pa(
                    "default",
                    "b-new",
                    "2024-02-01T00:00:00Z",
                    "mtls:\n  mode: PERMISSIVE"
                ),
                pa(
                    "default",
                    "a-old",
                    "2024-01-01T00:00:00Z",
                    "mtls:\n  mode: STRICT"
                )
            ),
            PLAIN,
            80,
            false,
        ),
        case(
            "invalid PeerAuthentication is STRICT",
            pa("default", "n", "1", "mtls:\n  mode: SOMETIMES"),
            PLAIN,
            80,
            false,
        ),
        case(
            "STRICT plus DENY: DENY still applies to mTLS",
            format!(
                "{}{}",
                pa("default", "n", "1", "mtls:\n  mode: STRICT"),
                ap(
                    "default",
                    "d",
                    &format!(
                        "action: DENY\n{}",
                        from_source("principals", "[\"*/sa/reviews\"]")
                    )
                )
            ),
            RV,
            80,
            false,
        ),
    ];
    v.push(Case {
        dst_ns: "other",
        ..case(
            "mission policy does not reach another namespace",
            mission(),
            RV,
            9080,
            true,
        )
    });
    v.push(Case {
        app: "details",
        ..case(
            "mission policy does not reach other workloads",
            mission(),
            RV,
            9080,
            true,
        )
    });
    v.push(Case {
        src_ip: "fd00::7",
        ..case(
            "IPv6 ipBlocks",
            ap("default", "x", &from_source("ipBlocks", "[\"fd00::/64\"]")),
            PLAIN,
            1,
            true,
        )
    });
    v.push(Case {
        src_ip: "::ffff:10.0.0.5",
        ..case(
            "v4-mapped source matches IPv4 blocks",
            ap(
                "default",
                "x",
                &from_source("ipBlocks", "[\"10.0.0.0/24\"]"),
            ),
            PLAIN,
            1,
            true,
        )
    });
    v
}

#[test]
fn semantics_table() {
    let cases = cases();
    assert!(cases.len() > 60, "{} rows", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let (pols, pas, _) = compile(&c.yaml);
        let labels: BTreeMap<String, String> = [("app".to_string(), c.app.to_string())].into();
        let conn = Connection {
            src_identity: c.src.map(|s| Identity::parse(s).unwrap()),
            src_ip: c.src_ip.parse().unwrap(),
            dst_ip: "10.9.0.9".parse().unwrap(),
            dst_port: c.dst_port,
        };
        let d = authz::evaluate(&pols, &pas, c.dst_ns, &labels, &conn);
        if d.allowed() != c.allow {
            failures.push(format!("{}: {d}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn status_of(yaml: &str) -> Status {
    compile(yaml).2.remove(0)
}

#[test]
fn problems_name_the_object_and_the_field() {
    let s = status_of(&ap(
        "default",
        "bad",
        &from_source("ipBlocks", "[\"10.0.0.1\", \"10.0.0.0/33\"]"),
    ));
    assert_eq!(s.state, State::Rejected);
    let text = s.to_string();
    assert!(text.contains("AuthorizationPolicy default/bad"), "{text}");
    assert!(
        text.contains("spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\""),
        "{text}"
    );
    assert!(text.contains("fails closed: allows nothing"), "{text}");

    let s = status_of(&ap(
        "default",
        "p",
        "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"0\"]",
    ));
    assert!(
        s.to_string()
            .contains("spec.rules[0].to[0].operation.ports[0]"),
        "{s}"
    );
    assert!(s.to_string().contains("denies every connection"), "{s}");

    let s = status_of(&ap("default", "a", "action: allow"));
    assert!(
        s.to_string()
            .contains("spec.action: \"allow\" is not ALLOW, DENY"),
        "{s}"
    );

    let s = status_of(&ap("default", "c", "action: CUSTOM"));
    assert!(s.to_string().contains("CUSTOM"), "{s}");
    assert_eq!(s.state, State::Rejected);

    let s = status_of(&ap("default", "w", "rules:\n- when:\n  - key: source.ip"));
    assert!(
        s.to_string()
            .contains("spec.rules[0].when[0]: needs values or notValues"),
        "{s}"
    );

    let s = status_of(&pa("default", "m", "1", "mtls:\n  mode: sometimes"));
    assert!(
        s.to_string().contains("PeerAuthentication default/m"),
        "{s}"
    );
    assert!(s.to_string().contains("spec.mtls.mode"), "{s}");
}

#[test]
fn conversions_and_ignored_policies_say_why() {
    let s = status_of(&ap(
        "default",
        "l7",
        "rules:\n- to:\n  - operation:\n      methods: [GET]",
    ));
    assert_eq!(s.state, State::Converted);
    assert!(
        s.to_string()
            .contains("spec.rules[0].to[0].operation.methods"),
        "{s}"
    );
    assert!(s.to_string().contains("omitted"), "{s}");
    let s = status_of(&ap("default", "au", "action: AUDIT\nrules:\n- {}"));
    assert_eq!(s.state, State::Ignored);
    let s = status_of(&ap("default", "ok", &from_source("principals", "[\"*\"]")));
    assert_eq!(s.state, State::Accepted);
    assert!(s.messages.is_empty());
    let s = status_of(&ap("default", "none", "{}"));
    assert!(
        s.to_string().contains("no rules: denies every connection"),
        "{s}"
    );
}

#[test]
fn hostile_documents_never_panic() {
    for doc in [
        "kind: AuthorizationPolicy",
        "kind: AuthorizationPolicy\nspec: 3",
        "kind: AuthorizationPolicy\nspec:\n  rules: {a: b}",
        "kind: AuthorizationPolicy\nspec:\n  rules:\n  - from: 7",
        "kind: AuthorizationPolicy\nspec:\n  rules:\n  - from:\n    - source: [1]",
        "kind: AuthorizationPolicy\nspec:\n  selector: [x]",
        "kind: AuthorizationPolicy\nspec:\n  rules:\n  - when: [{key: [1], values: {}}]",
        "kind: PeerAuthentication\nspec:\n  portLevelMtls: {x: 1}",
        "kind: PeerAuthentication\nspec:\n  mtls: [STRICT]",
    ] {
        let (_, _, st) = compile(doc);
        assert_eq!(st[0].state, State::Rejected, "{doc}: {}", st[0]);
    }
}

mod fuzz {
    use super::*;
    use ambit_common::testing::json;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "selector",
        "matchLabels",
        "action",
        "rules",
        "from",
        "to",
        "when",
        "source",
        "operation",
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "ports",
        "notPorts",
        "key",
        "values",
        "notValues",
        "mtls",
        "mode",
        "portLevelMtls",
        "targetRef",
        "targetRefs",
        "provider",
        "app",
        "ALLOW",
        "DENY",
        "AUDIT",
        "CUSTOM",
        "STRICT",
        "PERMISSIVE",
        "DISABLE",
        "source.ip",
        "destination.port",
        "hosts",
        "methods",
        "paths",
    ];

    proptest! {
        /// Any spec, in either kind: compiled (or rejected with a status), then evaluated
        /// against a connection — never a panic.
        #[test]
        fn fuzz_policies_compile_and_evaluate_without_panicking(
            spec in json(KEYS),
            labels in json(&["app", "version"]),
            peer_auth in any::<bool>(),
        ) {
            let kind = if peer_auth { "PeerAuthentication" } else { "AuthorizationPolicy" };
            let doc = serde_json::json!({
                "apiVersion": "security.istio.io/v1", "kind": kind,
                "metadata": {"name": "fuzzed", "namespace": "ns", "labels": labels},
                "spec": spec,
            });
            let yaml = serde_yaml_ng::to_string(&doc).unwrap();
            let (pols, pas, st) = compile(&yaml);
            prop_assert_eq!(st.len(), 1);
            let conn = Connection {
                src_identity: Some(Identity::new("td", "ns", "sa")),
                src_ip: "10.1.2.3".parse().unwrap(),
                dst_ip: "10.1.2.4".parse().unwrap(),
                dst_port: 8080,
            };
            let app: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
            let _ = authz::evaluate(&pols, &pas, "ns", &app, &conn);
        }

        /// Arbitrary bytes as a manifests file: loaded or reported, never a panic or a hang.
        #[test]
        fn fuzz_manifest_files_load_or_report(text in "\\PC{0,300}") {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("f.yaml"), &text).unwrap();
            let _ = crate::manifests::load(dir.path(), crate::records::Context { root_namespace: ROOT.into(), node: None });
        }
    }
}
