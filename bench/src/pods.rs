//! Pods at scale: what the cluster's pods cost the workload store every agent holds.
//! - On the running agent: its RSS over the empty agent, and how long after a manifests file of
//!   N remote pods (one `List`, ~480 bytes of JSON a pod) appears it serves them (its poll
//!   interval included), at each size of `--scale-pods`.
//! - In process, through the Kubernetes source against the API server double: the first sync
//!   of `--churn-pods` pods, then a steady churn of `--churn-rate` pod events a second: the
//!   store's time per pod change (its own histogram), the process's memory at the start,
//!   half-way and the end of the churn (the double's list response makes the absolute level
//!   meaningless; the agent figures measure memory), and an address lookup before and after.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_agent::k8s::double::{self, Double};
use ambit_agent::store::Store;
use ambit_proxy::mesh::Directory;
use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Pods per ReplicaSet (they share labels and a service account).
const PER_REPLICASET: usize = 10;
/// The file the agent figures write into the manifests directory.
const FILE: &str = "scale-pods.json";

/// The address of pod `i` (10.128.0.0/10).
fn address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + i as u32))
}

/// Pod `i` as the API server lists it (the fields a real pod has that the agent reads, and a
/// container it does not).
fn pod(i: usize, revision: usize) -> Value {
    let rs = i / PER_REPLICASET;
    let ip = address(i).to_string();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("web-{rs}-{i}"), "namespace": format!("ns-{}", rs % 50),
            "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "resourceVersion": revision.to_string(),
            "labels": {"app": format!("web-{rs}"), "pod-template-hash": format!("h{rs:08x}")},
            "annotations": {"ambit.dev/redirection": "enabled"},
        },
        "spec": {
            "serviceAccountName": format!("sa-{}", rs % 200), "nodeName": format!("node-{}", i % 500),
            "containers": [{"name": "app", "image": "registry.example/web:1.0"}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn pod_list(n: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
        "items": (0..n).map(|i| pod(i, 1)).collect::<Vec<_>>()})
}

/// The pods the agent's last manifests load counted.
fn loaded_pods(log: &str) -> Option<usize> {
    let line = log.lines().rev().find(|l| l.contains("manifests loaded"))?;
    let rest = &line[line.find(" pods=")? + 6..];
    rest.split(' ').next()?.parse().ok()
}

/// On the running agent: for each size, the file of that many pods replaces the previous one;
/// served time and RSS over `empty` (the agent before any of them).
pub fn agent_figures(
    manifests: &Path,
    sizes: &[usize],
    rss: impl Fn() -> u64,
    log: impl Fn() -> String,
    settle: Duration,
) -> Result<Vec<Value>> {
    let base = loaded_pods(&log()).context("the agent has not loaded its manifests")?;
    let staging = manifests.with_extension("pods-staging");
    std::fs::create_dir_all(&staging)?;
    let empty = rss();
    let mut rows = Vec::new();
    for &n in sizes {
        let file = staging.join(FILE);
        std::fs::write(&file, serde_json::to_vec(&pod_list(n))?)?;
        let bytes = std::fs::metadata(&file)?.len();
        let t = Instant::now();
        std::fs::rename(&file, manifests.join(FILE))?;
        while loaded_pods(&log()) != Some(base + n) {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(300),
                "the agent did not load {n} pods within 300 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let served = t.elapsed();
        std::thread::sleep(settle);
        let after = rss();
        let growth = after.saturating_sub(empty);
        rows.push(
            json!({"pods": n, "file_bytes": bytes, "served_after_s": served.as_secs_f64(),
            "rss_empty_kib": empty, "rss_kib": after, "rss_growth_kib": growth,
            "bytes_per_pod": growth as f64 * 1024.0 / n as f64}),
        );
    }
    std::fs::remove_file(manifests.join(FILE))?;
    std::fs::remove_dir_all(&staging)?;
    let t = Instant::now();
    while loaded_pods(&log()) != Some(base) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the agent did not drop the pods"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(rows)
}

/// This process's RSS after giving freed memory back (as the agent does every pass).
fn own_rss_kib() -> u64 {
    ambit_common::sys::trim_heap();
    crate::rss_kib(std::process::id())
}

/// Nanoseconds per address lookup, over `ips` cycled `rounds` times.
fn lookup_ns(store: &Store, ips: &[IpAddr], rounds: usize) -> f64 {
    let t = Instant::now();
    let mut hits = 0;
    for _ in 0..rounds {
        for ip in ips {
            hits += usize::from(std::hint::black_box(store.by_ip(*ip)).is_some());
        }
    }
    assert_eq!(hits, rounds * ips.len(), "every address is known");
    t.elapsed().as_nanos() as f64 / (rounds * ips.len()) as f64
}

/// Cumulative bucket counts of the store's pod-change histogram: (upper bound s, count).
fn change_buckets(store: &Store) -> Vec<(f64, u64)> {
    let mut r = prometheus_client::registry::Registry::default();
    store.register_metrics(&mut r);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r).expect("encoding metrics");
    text.lines()
        .filter_map(|l| l.strip_prefix("ambit_store_pod_change_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound under which `q` of the changes between two snapshots fell.
fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = delta.last().map_or(0, |d| d.1);
    delta
        .iter()
        .find(|(_, c)| *c as f64 >= q * total as f64)
        .map_or(f64::INFINITY, |d| d.0)
}

/// In process: the Kubernetes source's first sync of `pods` pods from the double, then
/// `rate` pod events a second for `seconds`.
pub fn churn_figures(pods: usize, rate: usize, seconds: f64) -> Result<Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let d = Arc::new(Double::default());
        let empty = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []});
        for path in [
            double::NAMESPACES,
            double::SERVICES,
            double::SLICES,
            double::POLICIES,
            double::PEER_AUTHS,
        ] {
            d.list(path, 200, empty.clone());
        }
        d.list(double::PODS, 200, pod_list(pods));
        let store = Store::new("cluster.local");
        let stop = tokio_util::sync::CancellationToken::new();
        let t = Instant::now();
        tokio::spawn(ambit_agent::k8s::run(
            d.client(),
            store.clone(),
            // One node of the 500 the pods are spread over: its pods keep their labels.
            ambit_agent::records::Context {
                root_namespace: "istio-system".into(),
                node: Some("node-0".into()),
            },
            stop.clone(),
        ));
        while store.counts().0 < pods || d.watching(double::PODS) == 0 {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(300),
                "the first sync of {pods} pods did not finish within 300 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let sync = t.elapsed();
        // The list response held by the double is not the store's: gone before measuring.
        d.lists.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let sample: Vec<IpAddr> = (0..pods).step_by((pods / 1000).max(1)).map(address).collect();
        let lookup_before = lookup_ns(&store, &sample, 200);
        let rss_start = own_rss_kib();
        let buckets_before = change_buckets(&store);

        // The churn, one event a tick: a label change (another ReplicaSet hash), or a delete
        // and, on the next tick, the re-creation, of pods spread over the set; the last event
        // names a marker the store must show. RSS is read half-way and at the end: a store
        // that grows with churn would show it.
        let events = (rate as f64 * seconds) as usize;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let started = Instant::now();
        let mut recreate: Option<Value> = None;
        let mut rss_mid = 0;
        for sent in 0..events {
            tick.tick().await;
            if sent == events / 2 {
                rss_mid = own_rss_kib();
            }
            if let Some(p) = recreate.take() {
                d.event(double::PODS, "ADDED", p);
                continue;
            }
            let i = (sent * 7919) % pods;
            let mut p = pod(i, 2 + sent);
            if sent % 4 == 3 && sent + 1 < events {
                d.event(double::PODS, "DELETED", p.clone());
                p["metadata"]["uid"] = json!(format!("00000000-0000-4000-9000-{sent:012}"));
                recreate = Some(p);
            } else {
                // One of two hashes per ReplicaSet, as a rollout and its rollback: the set of
                // label sets stays bounded, so memory that grew over the churn would be a leak.
                let rs = i / PER_REPLICASET;
                p["metadata"]["labels"]["pod-template-hash"] =
                    json!(format!("h{rs:08x}-{}", (sent / pods) % 2 + 1));
                d.event(double::PODS, "MODIFIED", p);
            }
        }
        let churn_for = started.elapsed();
        let mut last = pod(0, 3 + events);
        last["metadata"]["labels"]["marker"] = json!("end");
        d.event(double::PODS, "MODIFIED", last);
        // A pod of this agent's node (node-0): it keeps its labels.
        let (ns0, name0) = ("ns-0", "web-0-0");
        let t = Instant::now();
        let applied = |s: &Store| {
            s.pod(ns0, name0)
                .and_then(|p| p.labels.clone())
                .is_some_and(|l| l.get("marker").is_some_and(|m| m == "end"))
        };
        while !applied(&store) {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "the churn was not applied");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let buckets_after = change_buckets(&store);
        let rss_end = own_rss_kib();
        let lookup_after = lookup_ns(&store, &sample, 200);
        stop.cancel();
        anyhow::ensure!(store.counts().0 == pods, "pods lost in the churn: {}", store.counts().0);
        Ok(json!({"pods": pods, "first_sync_s": sync.as_secs_f64(),
            "events": events + 1, "rate_per_s": rate, "churn_s": churn_for.as_secs_f64(),
            "change_p50_s": quantile(&buckets_before, &buckets_after, 0.5),
            "change_p99_s": quantile(&buckets_before, &buckets_after, 0.99),
            "rss_churn_start_kib": rss_start, "rss_churn_mid_kib": rss_mid,
            "rss_churn_end_kib": rss_end,
            "lookup_ns_before": lookup_before, "lookup_ns_after": lookup_after}))
    })
}

/// The Markdown rows of the pod figures.
pub fn rows(agent: &[Value], churn: &Value) -> String {
    let mut md = String::from("\n| pods at scale | figure |\n|---|---|\n");
    for r in agent {
        md.push_str(&format!(
            "| {} remote pods (manifests, {:.1} MB file) | served {:.2} s after the file appeared; agent RSS +{:.1} MB over the empty agent ({:.0} bytes a pod) |\n",
            r["pods"], r["file_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["served_after_s"].as_f64().unwrap_or(0.0),
            r["rss_growth_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            r["bytes_per_pod"].as_f64().unwrap_or(0.0)
        ));
    }
    let us = |k: &str| churn[k].as_f64().unwrap_or(f64::NAN) * 1e6;
    md.push_str(&format!(
        "| {} pods through the Kubernetes source (in process) | first sync {:.2} s (list decoded, converted, stored) |\n\
         | churn: {} pod events at {}/s ({:.0} s) | store time per pod change p50 ≤ {:.0} µs, p99 ≤ {:.0} µs (histogram bounds); process RSS start / half-way / end {:.1} / {:.1} / {:.1} MB; address lookup {:.0} → {:.0} ns |\n",
        churn["pods"], churn["first_sync_s"].as_f64().unwrap_or(0.0),
        churn["events"], churn["rate_per_s"], churn["churn_s"].as_f64().unwrap_or(0.0),
        us("change_p50_s"), us("change_p99_s"),
        churn["rss_churn_start_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        churn["rss_churn_mid_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        churn["rss_churn_end_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        churn["lookup_ns_before"].as_f64().unwrap_or(0.0),
        churn["lookup_ns_after"].as_f64().unwrap_or(0.0),
    ));
    md
}
