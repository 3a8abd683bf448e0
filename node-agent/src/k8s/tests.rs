//! The Kubernetes source against the in-process double of the API server ([`super::double`]),
//! fed recorded responses (testdata/kube/*.json) and the watch events each test pushes.

use std::time::Instant;

use ambit_common::enrollment::Enrollment;
use ambit_common::protocol::PodInfo;
use ambit_proxy::authz::Connection;
use ambit_proxy::mesh::Directory;
use serde_json::{Value, json};

use super::double::*;
use super::*;

fn recorded(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/kube")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls `f` (every 10 ms, at most 10 s): the condition must become true.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not within 10 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn conn() -> Connection {
    Connection {
        src_identity: Some(ambit_proxy::identity::Identity::new(
            "td", "default", "default",
        )),
        src_ip: "10.9.0.7".parse().unwrap(),
        dst_ip: "10.9.0.4".parse().unwrap(),
        dst_port: 8080,
    }
}

struct Running {
    double: Arc<Double>,
    store: Arc<Store>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The recorded cluster: pods, namespaces, one policy; PEER_AUTHS is not listed, so the double
/// answers 404, as a cluster without that CRD does.
fn start() -> Running {
    let double = Arc::new(Double::default());
    double.list(PODS, 200, recorded("pods.json"));
    double.list(NAMESPACES, 200, recorded("namespaces.json"));
    double.list(SERVICES, 200, recorded("services.json"));
    double.list(SLICES, 200, recorded("endpointslices.json"));
    double.list(POLICIES, 200, recorded("authorizationpolicies.json"));
    start_with(double)
}

/// Runs the Kubernetes source against `double` until the returned guard is dropped.
fn start_with(double: Arc<Double>) -> Running {
    let store = Store::new("td");
    let stop = CancellationToken::new();
    tokio::spawn(run(
        double.client(),
        store.clone(),
        crate::records::Context {
            root_namespace: "istio-system".into(),
            node: None,
        },
        stop.clone(),
    ));
    Running {
        double,
        store,
        stop,
    }
}

#[tokio::test]
async fn recorded_lists_feed_the_store_and_a_missing_crd_counts_as_empty() {
    let r = start();
    let s = &r.store;
    eventually("first snapshot", || s.synced() && s.has_sources()).await;
    assert!(r.double.count(&format!("GET {PEER_AUTHS}")) >= 1);
    // Enrollment by the namespace label, by the pod label, and the uid guard.
    assert_eq!(
        s.enrollment("shop", "web", "uid-web"),
        Enrollment::Capture("namespace label ambit.dev/dataplane-mode=enabled")
    );
    assert!(matches!(
        s.enrollment("shop", "legacy", "uid-legacy"),
        Enrollment::Skip(_)
    ));
    assert!(matches!(
        s.enrollment("default", "db", "uid-db"),
        Enrollment::Skip(_)
    ));
    assert!(matches!(
        s.enrollment("default", "tool", ""),
        Enrollment::Capture(_)
    ));
    assert_eq!(
        s.enrollment("shop", "web", "uid-of-a-newer-web"),
        Enrollment::Undecided
    );
    // Identity from the service account; addresses; host-network pods have none of theirs.
    assert_eq!(
        s.identity_of("shop", "web").to_string(),
        "spiffe://td/ns/shop/sa/web"
    );
    let w = s.by_ip("10.9.0.4".parse().unwrap()).unwrap();
    assert_eq!((&*w.namespace, &*w.name), ("shop", "web"));
    assert!(w.hbone, "web carries the redirection annotation");
    assert!(!s.by_ip("10.9.0.5".parse().unwrap()).unwrap().hbone);
    assert!(s.by_ip("192.168.1.10".parse().unwrap()).is_none());
    // The recorded allow-nothing policy in shop applies to web; db's namespace has none.
    assert!(!s.authorize("shop", "web", &conn()).allowed());
    assert!(s.authorize("default", "db", &conn()).allowed());
    let statuses = s.policy_statuses();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
}

#[tokio::test]
async fn watch_events_update_the_store_and_a_410_relists() {
    let r = start();
    let (s, d) = (&r.store, &r.double);
    eventually("first snapshot", || s.synced() && s.has_sources()).await;
    eventually("watches open", || {
        d.watching(PODS) > 0 && d.watching(NAMESPACES) > 0 && d.watching(POLICIES) > 0
    })
    .await;

    // The namespace default is labelled: its pods become enrolled.
    let mut ns = recorded("namespaces.json")["items"][1].clone();
    ns["metadata"]["labels"] = json!({"ambit.dev/dataplane-mode": "enabled"});
    ns["metadata"]["resourceVersion"] = "11".into();
    assert_eq!(d.event(NAMESPACES, "MODIFIED", ns), 1);
    eventually("db enrolled by its namespace", || {
        matches!(
            s.enrollment("default", "db", "uid-db"),
            Enrollment::Capture(_)
        )
    })
    .await;

    // A pod appears, another goes.
    let mut new = recorded("pods.json")["items"][0].clone();
    new["metadata"]["name"] = "web-2".into();
    new["metadata"]["uid"] = "uid-web-2".into();
    new["metadata"]["resourceVersion"] = "12".into();
    new["status"]["podIPs"] = json!([{"ip": "10.9.0.14"}]);
    d.event(PODS, "ADDED", new);
    let web = recorded("pods.json")["items"][0].clone();
    d.event(PODS, "DELETED", web);
    eventually("web-2 known, web gone", || {
        s.pod("shop", "web-2").is_some() && s.pod("shop", "web").is_none()
    })
    .await;
    assert!(s.by_ip("10.9.0.14".parse().unwrap()).is_some());

    // The policy is deleted: web is reachable.
    let pol = recorded("authorizationpolicies.json")["items"][0].clone();
    d.event(POLICIES, "DELETED", pol);
    eventually("policy gone", || {
        s.authorize("shop", "web-2", &conn()).allowed()
    })
    .await;

    // The API server expires the watch (410 Gone): the watcher re-lists, and the re-list
    // replaces the cache (web-2, which the new list lacks, disappears).
    let mut relist = recorded("pods.json");
    relist["metadata"]["resourceVersion"] = "20".into();
    relist["items"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["metadata"]["name"] != "web");
    let mut fresh = relist["items"][0].clone();
    fresh["metadata"]["name"] = "fresh".into();
    fresh["metadata"]["uid"] = "uid-fresh".into();
    relist["items"].as_array_mut().unwrap().push(fresh);
    {
        let mut lists = d.lists.lock().unwrap();
        let q = lists.get_mut(PODS).unwrap();
        q.clear();
        q.push_back((200, relist));
    }
    let lists_before = d.lists_of(PODS);
    d.event(
        PODS,
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "Expired", "message": "too old resource version", "code": 410}),
    );
    eventually("re-listed after 410", || {
        s.pod("shop", "fresh").is_some() && s.pod("shop", "web-2").is_none()
    })
    .await;
    assert!(d.lists_of(PODS) > lists_before);
}

#[tokio::test]
async fn captured_pods_are_annotated_once_and_only_they() {
    let r = start();
    let (s, d) = (&r.store, &r.double);
    eventually("first snapshot", || s.synced() && s.has_sources()).await;
    let captured = |ns: &str, name: &str, uid: &str| PodInfo {
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
        ips: vec![],
        annotations: Default::default(),
        netns_path: "/proc/self/ns/net".into(),
        rules: None,
    };
    s.pod_added(&captured("default", "db", "uid-db"));
    // Already annotated: no patch. Stale uid: no patch (it is an older pod of that name).
    s.pod_added(&captured("shop", "web", "uid-web"));
    s.pod_added(&captured("default", "tool", "uid-of-another-tool"));
    eventually("db annotated", || !d.patches.lock().unwrap().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let patches = d.patches.lock().unwrap().clone();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].0, "/api/v1/namespaces/default/pods/db/status");
    assert_eq!(
        patches[0].1,
        json!({"metadata": {"annotations": {"ambit.dev/redirection": "enabled"}}})
    );
}

#[tokio::test]
async fn an_unreachable_api_server_keeps_the_agent_unsynced_and_inbound_refused() {
    let double = Arc::new(Double::default());
    for p in [PODS, NAMESPACES, SERVICES, SLICES, POLICIES, PEER_AUTHS] {
        double.list(
            p,
            503,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "ServiceUnavailable", "message": "etcd is down", "code": 503}),
        );
    }
    let r = start_with(double);
    let (double, store) = (&r.double, &r.store);
    // Several list attempts (back-off) and still nothing: not synced, inbound refused, and
    // enrollment cannot be answered.
    eventually("retried lists", || {
        double.count(&format!("GET {PODS}")) >= 2
    })
    .await;
    assert!(!store.synced());
    assert_eq!(store.pending_sources(), vec![Source::Kubernetes]);
    let d = store.authorize("default", "db", &conn());
    assert!(!d.allowed() && d.to_string().contains("not loaded"), "{d}");
    let resp = crate::cni_server::enrollment(store, "default", "db", "", Duration::from_millis(50));
    assert!(!resp.ok);
    assert!(resp.error.unwrap().contains("not yet synced"));
}

/// Which endpoints new connections to `vip` go to (many picks).
fn endpoints_chosen(s: &Store, vip: &str) -> std::collections::BTreeSet<String> {
    let vip: std::net::SocketAddr = vip.parse().unwrap();
    let Some(svc) = s.service(vip.ip()) else {
        return Default::default();
    };
    (0..200)
        .filter_map(|_| svc.pick(vip, "10.9.0.7".parse().unwrap()).ok())
        .map(|e| e.addr.to_string())
        .collect()
}

fn web_slice(name: &str, rv: &str, ips: &[&str]) -> Value {
    let mut slice = recorded("endpointslices.json")["items"][0].clone();
    slice["metadata"]["name"] = name.into();
    slice["metadata"]["resourceVersion"] = rv.into();
    slice["endpoints"] = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    slice
}

#[tokio::test]
async fn services_and_endpoint_slices_follow_the_watch_as_endpoints_scale() {
    let r = start();
    let (s, d) = (&r.store, &r.double);
    eventually("first snapshot", || s.synced() && s.has_sources()).await;
    eventually("watches open", || {
        d.watching(SERVICES) > 0 && d.watching(SLICES) > 0
    })
    .await;
    // The recorded Service resolves to its recorded endpoint through the named targetPort;
    // the headless one has no VIP.
    assert_eq!(
        endpoints_chosen(s, "10.96.0.20:80"),
        ["10.9.0.4:8080".to_string()].into()
    );
    assert_eq!(s.service_counts(), (1, 1));
    let svc = s.service("10.96.0.20".parse().unwrap()).unwrap();
    assert_eq!(&*svc.name.hostname, "web.shop.svc.cluster.local");
    assert_eq!(
        s.service_of_endpoint("10.9.0.4:8080".parse().unwrap())
            .map(|n| n.name.clone()),
        Some("web".into())
    );

    // Scale 1 -> 3 (a second slice), 3 -> 0, 0 -> 2.
    let three = ["10.9.0.4", "10.9.0.21", "10.9.0.22"];
    d.event(
        SLICES,
        "MODIFIED",
        web_slice("web-x7k2p", "21", &three[..2]),
    );
    d.event(SLICES, "ADDED", web_slice("web-q9z4m", "22", &three[2..]));
    eventually("three endpoints", || {
        endpoints_chosen(s, "10.96.0.20:80").len() == 3
    })
    .await;
    d.event(SLICES, "MODIFIED", web_slice("web-x7k2p", "23", &[]));
    d.event(SLICES, "DELETED", web_slice("web-q9z4m", "24", &[]));
    eventually("no endpoint", || {
        endpoints_chosen(s, "10.96.0.20:80").is_empty()
    })
    .await;
    let svc = s.service("10.96.0.20".parse().unwrap()).unwrap();
    assert!(matches!(
        svc.pick(
            "10.96.0.20:80".parse().unwrap(),
            "10.9.0.7".parse().unwrap()
        ),
        Err(ambit_proxy::service::NoEndpoint::NoneReady { port: 80, .. })
    ));
    d.event(
        SLICES,
        "MODIFIED",
        web_slice("web-x7k2p", "25", &["10.9.0.31", "10.9.0.32"]),
    );
    eventually("two new endpoints", || {
        endpoints_chosen(s, "10.96.0.20:80")
            == ["10.9.0.31:8080".to_string(), "10.9.0.32:8080".to_string()].into()
    })
    .await;

    // Made headless, the Service has no VIP: its record goes (one change, not a new list);
    // given its VIP back, it resolves to the same endpoints again.
    let web = recorded("services.json")["items"][0].clone();
    let mut headless = web.clone();
    headless["spec"]["clusterIP"] = "None".into();
    headless["spec"]["clusterIPs"] = serde_json::json!(["None"]);
    headless["metadata"]["resourceVersion"] = "26".into();
    d.event(SERVICES, "MODIFIED", headless);
    eventually("headless: no VIP", || {
        s.service("10.96.0.20".parse().unwrap()).is_none()
    })
    .await;
    assert_eq!(s.service_counts(), (0, 0));
    let mut back = web.clone();
    back["metadata"]["resourceVersion"] = "27".into();
    d.event(SERVICES, "MODIFIED", back);
    eventually("VIP back with its endpoints", || {
        endpoints_chosen(s, "10.96.0.20:80")
            == ["10.9.0.31:8080".to_string(), "10.9.0.32:8080".to_string()].into()
    })
    .await;

    // The Service goes: its VIP is no longer resolved.
    d.event(SERVICES, "DELETED", web);
    eventually("Service gone", || {
        s.service("10.96.0.20".parse().unwrap()).is_none()
    })
    .await;
}
