//! The benchmark suite still works: `ambit-bench --smoke` (tiny durations, one repetition)
//! runs every part and writes a report with every figure. It checks that figures exist and are
//! positive, never how fast anything is.

use std::process::Command;

/// Runs ambit-bench with `args` plus `--json` and `--markdown` into a scratch directory (kept
/// with the returned guard; the report is `report.md` there); returns its JSON.
fn run_bench(tag: &str, args: &[&str]) -> (serde_json::Value, ambit_tests::TempDir) {
    ambit_tests::require_root();
    let dir = ambit_tests::TempDir::new(tag);
    let json = dir.0.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ambit-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(dir.0.join("report.md"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (v, dir)
}

/// The through-Ambit-vs-direct rows of one topology (names prefixed `scope`): 9 data-path
/// figures + agent CPU during throughput, at a paced load and per new connection + 2 scaling
/// rows, unpinned and pinned, each measured (above zero) on both sides; the agent figures
/// summed over `agents` agent processes in every run.
fn check_path_figures(figures: &serde_json::Value, scope: &str, agents: u64) {
    let figures = figures.as_array().unwrap();
    assert_eq!(figures.len(), 28, "{figures:#?}");
    for f in figures {
        assert!(f["figure"].as_str().unwrap().starts_with(scope), "{f}");
        if let Some(runs) = f.get("agents") {
            assert_eq!(runs, &serde_json::json!([agents]), "{f}");
        }
        if let Some(d) = f["direct_scaling"].as_f64() {
            assert!(d > 0.0 && f["ambit_scaling"].as_f64().unwrap() > 0.0, "{f}");
            continue;
        }
        let ambit = f["ambit"].as_f64().unwrap();
        assert!(ambit > 0.0, "{f}");
        if let Some(d) = f["direct"].as_f64() {
            assert!(d > 0.0 && f["ratio"].as_f64().unwrap() > 0.0, "{f}");
        }
    }
}

/// The this-build-vs-baseline rows of one topology (names prefixed `scope`).
fn check_baseline_rows(baseline: &serde_json::Value, scope: &str) {
    // This build ÷ baseline: every figure once per variant (9 + 5 agent rows), the best run
    // of each latency p50 (3) and the latency each agent adds over the direct run (3 p50s),
    // each with a ratio.
    let baseline = baseline.as_array().unwrap();
    assert_eq!(baseline.len(), 2 * (9 + 5 + 3 + 3), "{baseline:#?}");
    for r in baseline {
        assert!(r["figure"].as_str().unwrap().starts_with(scope), "{r}");
        let (b, x) = (r["baseline"].as_f64().unwrap(), r["this"].as_f64().unwrap());
        if b > 0.0 && x > 0.0 {
            assert!(r["ratio"].as_f64().is_some_and(f64::is_finite), "{r}");
        } else {
            // Only a latency added over the direct run can be at or below zero (the direct
            // run was the slower one), and then there is no ratio.
            let name = r["figure"].as_str().unwrap();
            let added = name.strip_prefix(scope).unwrap().starts_with("added ");
            assert!(added && r["ratio"].is_null(), "{r}");
        }
        assert_eq!(r["this_runs"].as_array().unwrap().len(), 1, "{r}");
    }
}

#[test]
fn the_benchmark_suite_runs_in_smoke_mode_and_reports_every_figure() {
    // The built agent as its own baseline: the comparison table's plumbing, not a result.
    let agent = ambit_tests::bins().agent.to_str().unwrap().to_owned();
    let (v, dir) = run_bench("bench-smoke", &["--smoke", "--baseline-agent", &agent]);
    let md = dir.0.join("report.md");
    // Both topologies: one agent doing both halves, and two nodes (an agent each).
    assert_eq!(
        v["settings"]["topology"],
        serde_json::json!(["same-node", "cross-node"]),
        "{:#}",
        v["settings"]
    );
    check_path_figures(&v["figures"], "", 1);
    check_path_figures(&v["cross_node"]["figures"], "across nodes: ", 2);
    let summed = |f: &serde_json::Value| f.get("agents").is_some();
    for figures in [&v["figures"], &v["cross_node"]["figures"]] {
        let n = figures
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| summed(f))
            .count();
        assert_eq!(n, 2, "an agent CPU row per variant: {figures:#?}");
    }
    for peak in [
        "peak_during_throughput",
        "peak_during_first_throughput",
        "peak_during_many",
    ] {
        assert!(v["agent_rss_kib"][peak].as_u64().unwrap() > 0, "{peak}");
    }
    assert_eq!(v["agent_rss_kib"]["by_pods"].as_array().unwrap().len(), 2);
    assert!(v["cni_add_ms"]["p50"].as_f64().unwrap() > 0.0);
    // Services at scale: the set loaded in process (small and full size) and by the agent,
    // and the data path by VIP next to by pod IP.
    let svc = &v["services"];
    let store = svc["store"].as_array().unwrap();
    assert_eq!(store.len(), 2, "{svc:#}");
    for r in store {
        for k in ["load_s", "vip_lookup_ns", "pod_lookup_ns"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
    }
    assert_eq!(svc["agent"]["services"], 100);
    assert!(svc["agent"]["served_after_s"].as_f64().unwrap() > 0.0);
    assert!(svc["agent"]["rss_after_kib"].as_u64().unwrap() > 0);
    for k in [
        "gbps_pod",
        "gbps_vip",
        "connect_p50_us_pod",
        "connect_p50_us_vip",
    ] {
        assert!(svc["vip_vs_pod"][k].as_f64().unwrap() > 0.0, "{k}: {svc:#}");
    }
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(
        table.contains("| throughput, 1 stream (pinned, 1 vCPU) |"),
        "{table}"
    );
    for row in [
        "| throughput, 4 streams |",
        "| throughput, 20 concurrent connections (pinned, 1 vCPU) |",
        "| scaling: 20 connections ÷ 1 stream |",
        "| agent RSS peak during 20 concurrent connections |",
        "| Services: throughput, 1 stream, by pod IP vs by Service VIP (100 Services loaded) |",
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    check_baseline_rows(&v["baseline"], "");
    check_baseline_rows(&v["cross_node"]["baseline"], "across nodes: ");
    for row in [
        "| throughput, 1 stream (pinned, 1 vCPU) | ",
        "| agent CPU per Gbit/s, 1 stream |",
        "| agent CPU at 1,000 round trips/s (1 B) (pinned, 1 vCPU) |",
        "| added RTT 1 B p50 (over direct ",
        "| added new conn + 1 B echo p50 (over direct ",
        "| new conn + 1 B echo p50, best run (pinned, 1 vCPU) | ",
        "| across nodes: throughput, 1 stream (pinned, 1 vCPU) | ",
        "| across nodes: agent context switches per GB, 1 stream |",
        "| across nodes: agent CPU per new connection (pinned, 1 vCPU) |",
        "| across nodes: added RTT 1 B p50 (over direct ",
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
}

/// An A/B run that fails says why: a baseline agent that cannot start stops the bench (a
/// failure, not a table with a hole) and the bench prints that agent's last log lines, named
/// by the binary and the node, before its error. The baseline's agents are started with the
/// arguments both get (`--agent-arg`) and then their own (`--baseline-agent-arg`).
#[test]
fn an_alternated_run_that_fails_prints_the_failing_agents_log() {
    ambit_tests::require_root();
    let dir = ambit_tests::TempDir::new("bench-fail");
    let agent = dir.0.join("agent-that-refuses");
    std::fs::write(
        &agent,
        "#!/bin/sh\necho \"baseline-marker: this agent refuses to start: $*\" >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ambit-bench"))
        .args(["--smoke", "--topology", "cross-node", "--baseline-agent"])
        .arg(&agent)
        .args([
            "--agent-arg=--log=info",
            "--baseline-agent-arg=--baseline-only-marker",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bench succeeded:\n{stderr}");
    // The baseline runs first; the client node's agent is the first it restarts.
    let header = format!("{}: node 1 of 2: agent log (last lines):", agent.display());
    let (_, tail) = stderr
        .split_once(&header)
        .unwrap_or_else(|| panic!("no log tail of the failing agent:\n{stderr}"));
    assert!(
        tail.contains("baseline-marker: this agent refuses to start"),
        "the tail is not the failing agent's log:\n{stderr}"
    );
    assert!(
        tail.contains(" --log=info --baseline-only-marker\n"),
        "the baseline agent's arguments are not both sides' then its own:\n{stderr}"
    );
    assert!(
        stderr.contains("exited (exit status: 3) before it created its socket"),
        "the error does not say the agent exited:\n{stderr}"
    );
}

/// The sockmap spike's program really moves a same-host pair's bytes socket to socket, on
/// both kinds of leg: with both sockets in its map the leg's device (loopback, veth) carries
/// (almost) none of them, without it all of them. Checks where the bytes went, never how
/// fast.
#[test]
fn the_sockmap_spike_takes_a_pairs_bytes_off_the_device() {
    let (v, _dir) = run_bench(
        "bench-spike",
        &[
            "--sockmap-spike",
            "--seconds",
            "0.3",
            "--iterations",
            "200",
            "--repeat",
            "1",
        ],
    );
    for leg in ["loopback", "veth"] {
        let runs = &v["legs"][leg];
        let dev = |mode: &str| runs[mode][0]["device_bytes_per_byte"].as_f64().unwrap();
        assert!(
            dev("tcp") > 0.9,
            "{leg}: plain TCP crosses the device: {v:#}"
        );
        assert!(
            dev("sk_msg_redirect") < 0.05,
            "{leg}: redirected, the bytes skip it: {v:#}"
        );
        for mode in ["tcp", "sk_msg_redirect"] {
            assert!(runs[mode][0]["gbps"].as_f64().unwrap() > 0.0, "{v:#}");
            assert!(runs[mode][0]["rtt_p50_us"].as_f64().unwrap() > 0.0, "{v:#}");
        }
    }
}

/// The kernel TLS spike hands rustls's keys to the kernel in the layout the kernel expects:
/// in a guest booted from a kernel with `CONFIG_TLS` (`ktls-guest.sh`, the CPU emulated: no
/// figure here says anything about speed), records sealed by the kernel open in rustls
/// (`ktls-tx`), rustls's open in the kernel (`ktls-rx`), and every mode delivers every byte
/// app A sent (the spike fails otherwise). Checks where the bytes went, never how fast.
#[test]
fn the_ktls_spike_moves_every_byte_between_rustls_and_the_kernel_in_a_guest() {
    ambit_tests::require_root();
    let dir = ambit_tests::TempDir::new("bench-ktls");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/ktls-guest.sh"))
        .args(["--seconds", "0.3", "--repeat", "1"])
        .env("AMBIT_BENCH", env!("CARGO_BIN_EXE_ambit-bench"))
        .env("AMBIT_GUEST_ACCEL", "tcg")
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.0.join("ktls-guest.json")).unwrap()).unwrap();
    assert!(
        v["kernel"].as_str().unwrap().starts_with("6.12."),
        "measured in the guest's kernel: {v:#}"
    );
    for mode in ["rustls", "ktls-tx", "ktls-rx", "ktls", "ktls-splice"] {
        let run = &v["modes"][mode][0];
        assert!(run["gbps"].as_f64().unwrap() > 0.0, "{mode}: {v:#}");
        assert!(
            run["relay_cpu_s_per_gb"].as_f64().unwrap() > 0.0,
            "{mode}: {v:#}"
        );
    }
}
