//! Services at scale: a manifests set of `--services` Services with `--endpoints-per-service`
//! endpoints each, measured three ways.
//! - In process, on the agent's own store: the full load of the set (parse every file, convert,
//!   index), and the cost of one VIP lookup next to one pod-address lookup — each at a small
//!   and at the full size, so that a cost growing with the set would show.
//! - On the running agent: its RSS before and after the set is loaded (growth), and how long
//!   after the files appear it serves them (its poll interval included).
//! - Through the data path: single-stream throughput and connection setup to the server pod
//!   called by a Service VIP next to the same figures to its pod IP, alternated in the same run.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ambit_agent::store::{Change, Keyed, Objects, Source, Store, Update};
use ambit_proxy::mesh::Directory;
use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Files the set is split into (a changed file is read again alone).
const FILES: usize = 10;

/// The VIP of Service `i` (10.96.0.0/16 holds 65,536).
pub fn vip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i as u32))
}

/// The address of endpoint `j` (10.200.0.0/14).
fn endpoint(j: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0ac8_0000 + j as u32))
}

/// Writes `services` Services (namespace `scale`, one TCP port 80 → named target port
/// `http` = 8080) and their EndpointSlices (`per` ready endpoints each) into `dir`, as
/// `List`s in [`FILES`] files.
pub fn write_set(dir: &Path, services: usize, per: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let chunk = services.div_ceil(FILES).max(1);
    for (f, start) in (0..services).step_by(chunk).enumerate() {
        let mut items = Vec::with_capacity(2 * chunk);
        for i in start..(start + chunk).min(services) {
            let name = format!("svc-{i}");
            items.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "scale"},
                "spec": {"clusterIP": vip(i).to_string(), "clusterIPs": [vip(i).to_string()],
                         "selector": {"app": name},
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]},
            }));
            let endpoints: Vec<Value> = (0..per)
                .map(|k| {
                    json!({"addresses": [endpoint(i * per + k).to_string()],
                           "conditions": {"ready": true}, "nodeName": format!("node-{}", k % 7),
                           "targetRef": {"kind": "Pod", "namespace": "scale", "name": format!("{name}-{k}")}})
                })
                .collect();
            items.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-abcde"), "namespace": "scale",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }));
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let file = dir.join(format!("scale-{f:02}.json"));
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
        std::fs::rename(tmp, file)?;
    }
    Ok(())
}

/// Nanoseconds per call of `f` over `keys` (each looked up `rounds` times, in a shuffled
/// order so that no lookup finds the last one's neighbour in the cache).
fn per_lookup(keys: &[IpAddr], rounds: usize, f: impl Fn(IpAddr) -> bool) -> f64 {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    fastrand::Rng::with_seed(7).shuffle(&mut order);
    let t = Instant::now();
    let mut hits = 0usize;
    for _ in 0..rounds {
        for &i in &order {
            hits += usize::from(f(black_box(keys[i])));
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / (rounds * keys.len()) as f64;
    assert_eq!(hits, rounds * keys.len(), "every key is known");
    ns
}

/// A store holding `pods` remote pods (one address each).
fn store_with_pods(pods: usize) -> Result<(Arc<Store>, Vec<IpAddr>)> {
    let store = Store::new("cluster.local");
    let mut o = Objects::default();
    let mut ips = Vec::with_capacity(pods);
    for j in 0..pods {
        let ip = endpoint(j);
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("p-{j}"), "namespace": "scale"},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip.to_string()}]},
        }))?;
        o.add_pod(ambit_agent::records::pod_record(&pod, None).context("a pod record")?);
        ips.push(ip);
    }
    store.set_manifests(o);
    Ok((store, ips))
}

/// The in-process figures: load time of the set and lookup costs (JSON rows).
pub fn store_figures(work: &Path, services: usize, per: usize) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    let small = (services / 100).max(10);
    let mut lookups = BTreeMap::new();
    for n in [small, services] {
        let dir = work.join(format!("set-{n}"));
        write_set(&dir, n, per)?;
        let store = Store::new("cluster.local");
        let t = Instant::now();
        let (objects, problems) = ambit_agent::manifests::load(
            &dir,
            ambit_agent::records::Context {
                root_namespace: "istio-system".into(),
                node: None,
            },
        );
        let parsed = t.elapsed();
        store.set_manifests(objects.clone());
        let loaded = t.elapsed();
        anyhow::ensure!(problems.is_empty(), "the set does not load: {problems:?}");
        anyhow::ensure!(
            store.service_counts() == (n, n * per),
            "loaded {:?}",
            store.service_counts()
        );
        let keys: Vec<IpAddr> = (0..n).map(vip).collect();
        let rounds = (2_000_000 / n).max(1);
        let svc_ns = per_lookup(&keys, rounds, |ip| store.service(ip).is_some());
        let (pods, pod_ips) = store_with_pods(n)?;
        let pod_ns = per_lookup(&pod_ips, rounds, |ip| pods.by_ip(ip).is_some());
        lookups.insert(n, (svc_ns, pod_ns));
        // One EndpointSlice changes (an endpoint leaves, then comes back), as the Kubernetes
        // source delivers it (one event) and as a manifests reload does (the whole set again,
        // one slice different).
        let first = objects
            .endpoint_slices
            .keys()
            .next()
            .cloned()
            .context("a slice")?;
        let full = objects.endpoint_slices[&first].clone();
        let mut fewer = (*full).clone();
        fewer.endpoints.pop();
        let fewer = Arc::new(fewer);
        let version = |i: usize| if i % 2 == 0 { &fewer } else { &full };
        let events = Store::new("cluster.local");
        events.update(
            Source::Kubernetes,
            Update {
                services: Keyed::Replace(objects.services.clone()),
                slices: Keyed::Replace(objects.endpoint_slices.clone()),
                ..Update::default()
            },
        );
        let (mut event_s, mut reload_s) = (Vec::new(), Vec::new());
        for i in 0..20 {
            let change = Change::Upsert(first.clone(), version(i).clone());
            let t = Instant::now();
            events.update(
                Source::Kubernetes,
                Update {
                    slices: Keyed::Changes(vec![change]),
                    ..Update::default()
                },
            );
            event_s.push(t.elapsed().as_secs_f64());
            let mut o = objects.clone();
            o.endpoint_slices.insert(first.clone(), version(i).clone());
            let t = Instant::now();
            store.set_manifests(o);
            reload_s.push(t.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            events.service_counts() == (n, n * per),
            "after the events {:?}",
            events.service_counts()
        );
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (slice_event_s, slice_reload_s) = (median(event_s), median(reload_s));
        rows.push(json!({"services": n, "endpoints": n * per,
            "load_s": loaded.as_secs_f64(), "parse_s": parsed.as_secs_f64(),
            "index_s": (loaded - parsed).as_secs_f64(),
            "vip_lookup_ns": svc_ns, "pod_lookup_ns": pod_ns, "pods_in_pod_store": n,
            "slice_event_s": slice_event_s, "slice_reload_s": slice_reload_s}));
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(rows)
}

/// A Markdown row per in-process figure.
pub fn store_rows(rows: &[Value]) -> String {
    let mut md = String::new();
    for r in rows {
        let (s, e) = (
            r["services"].as_u64().unwrap_or(0),
            r["endpoints"].as_u64().unwrap_or(0),
        );
        md.push_str(&format!(
            "| Services: full load of {s} Services / {e} endpoints (parse + index) | – | {:.2} s ({:.2} + {:.2}) | – |\n",
            r["load_s"].as_f64().unwrap_or(0.0),
            r["parse_s"].as_f64().unwrap_or(0.0),
            r["index_s"].as_f64().unwrap_or(0.0),
        ));
        md.push_str(&format!(
            "| Services: one EndpointSlice changed at {s} Services, store update as a watch event; as a manifests reload (median of 20) | – | {:.1} µs; {:.2} ms | – |\n",
            r["slice_event_s"].as_f64().unwrap_or(0.0) * 1e6,
            r["slice_reload_s"].as_f64().unwrap_or(0.0) * 1e3,
        ));
        md.push_str(&format!(
            "| Services: one VIP lookup at {s} Services; one pod lookup at {s} pods | – | {:.0} ns; {:.0} ns | – |\n",
            r["vip_lookup_ns"].as_f64().unwrap_or(0.0),
            r["pod_lookup_ns"].as_f64().unwrap_or(0.0),
        ));
    }
    md
}

/// Loads the set into the running agent's manifests directory: its RSS before and after
/// (after its reconcile pass returned freed memory), and how long after the files appeared it
/// served them. `loaded` says whether the agent's log shows a snapshot with `services`.
pub fn agent_figures(
    manifests: &Path,
    services: usize,
    per: usize,
    rss: impl Fn() -> u64,
    loaded: impl Fn(usize) -> bool,
    settle: std::time::Duration,
) -> Result<Value> {
    let staging = manifests.with_extension("staging");
    write_set(&staging, services, per)?;
    std::thread::sleep(settle);
    let before = rss();
    let t = Instant::now();
    for e in std::fs::read_dir(&staging)? {
        let e = e?;
        std::fs::rename(e.path(), manifests.join(e.file_name()))?;
    }
    // The bench's own Service is already there.
    while !loaded(services + 1) {
        anyhow::ensure!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "the agent did not load {services} Services within 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let served = t.elapsed();
    let peak_soon = rss();
    std::thread::sleep(settle);
    let after = rss();
    std::fs::remove_dir_all(&staging)?;
    Ok(json!({"services": services, "endpoints": services * per,
        "served_after_s": served.as_secs_f64(), "rss_before_kib": before,
        "rss_at_load_kib": peak_soon, "rss_after_kib": after,
        "rss_growth_kib": after.saturating_sub(before)}))
}
