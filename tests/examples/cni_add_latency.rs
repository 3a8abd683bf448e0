//! Measures CNI ADD latency through libcni (bridge + host-local + ambit-cni, agent running) for
//! N pods, and the agent's RSS with them captured. Not a test: a measurement.
//!
//!     AMBIT_PROFILE=release cargo run --release -p ambit-tests --example cni_add_latency -- 50

use ambit_tests::{Node, require_root};

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() -> anyhow::Result<()> {
    require_root();
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50);
    let mut node = Node::new("1.0.0")?;
    node.start_agent()?;
    let rss_idle = node.agent_rss_kib().unwrap_or(0);
    ambit_tests::cnitool(); // built before timing starts
    let mut pods = Vec::with_capacity(n);
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let pod = node.add_pod(&format!("p{i}"))?;
        ms.push(pod.add_time.as_secs_f64() * 1000.0);
        pods.push(pod);
    }
    let rss = node.agent_rss_kib().unwrap_or(0);
    eprintln!(
        "per-pod ms: {:?}",
        ms.iter().map(|m| *m as u32).collect::<Vec<_>>()
    );
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"pods\": {n}, \"add_ms_p50\": {:.1}, \"add_ms_p99\": {:.1}, \"add_ms_max\": {:.1}, \"agent_rss_kib_idle\": {rss_idle}, \"agent_rss_kib_with_pods\": {rss}}}",
        pct(&ms, 0.5),
        pct(&ms, 0.99),
        ms[ms.len() - 1]
    );
    Ok(())
}
