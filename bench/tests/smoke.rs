//! The benchmark suite still works: `ambit-bench --smoke` (tiny durations, one repetition)
//! runs every part and writes a report with every figure. It checks that figures exist and are
//! positive, never how fast anything is.

use std::process::Command;

#[test]
fn the_benchmark_suite_runs_in_smoke_mode_and_reports_every_figure() {
    ambit_tests::require_root();
    let dir = ambit_tests::TempDir::new("bench-smoke");
    let json = dir.0.join("bench.json");
    let md = dir.0.join("bench.md");
    let out = Command::new(env!("CARGO_BIN_EXE_ambit-bench"))
        .arg("--smoke")
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let figures = v["figures"].as_array().unwrap();
    // 9 data-path figures + agent CPU + 2 scaling rows, unpinned and pinned.
    assert_eq!(figures.len(), 24, "{v:#}");
    for f in figures {
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
    for peak in [
        "peak_during_throughput",
        "peak_during_first_throughput",
        "peak_during_many",
    ] {
        assert!(v["agent_rss_kib"][peak].as_u64().unwrap() > 0, "{peak}");
    }
    assert_eq!(v["agent_rss_kib"]["by_pods"].as_array().unwrap().len(), 2);
    assert!(v["cni_add_ms"]["p50"].as_f64().unwrap() > 0.0);
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
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
}
