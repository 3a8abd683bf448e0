//! The agent's own metrics (the data path's are in `ambit_proxy::metrics`), and the registry
//! that holds both for `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniLabels {
    /// ADD, DEL, CHECK, STATUS, GC.
    pub command: String,
    /// `ok` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

pub struct AgentMetrics {
    pub pods_captured: Gauge,
    /// Pods the agent knows (state records) but does not serve: re-adoption failed.
    pub pods_unserved: Gauge,
    pub cni_requests: Family<CniLabels, Counter>,
    /// Time from a complete ADD request to the acknowledgement (listeners bound).
    pub handoff_seconds: Histogram,
    /// In-pod rule sets found missing or altered and reinstalled.
    pub rules_repaired: Counter,
    /// Served pods whose redirect rules are missing and could not be reinstalled.
    pub pods_unprotected: Gauge,
    /// Expiry of the current certificate of each identity, as a Unix timestamp.
    pub cert_expiry: Family<IdentityLabels, Gauge<f64, AtomicU64>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            pods_captured: Gauge::default(),
            pods_unserved: Gauge::default(),
            cni_requests: Family::default(),
            handoff_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            rules_repaired: Counter::default(),
            pods_unprotected: Gauge::default(),
            cert_expiry: Family::default(),
        }
    }
}

impl AgentMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "ambit_log_lines_dropped",
            "Log lines dropped because the reader of the agent's stderr (a pipe) was not taking them",
            crate::log::DROPPED.clone(),
        );
        r.register(
            "ambit_pods_captured",
            "Pods captured and served by this agent",
            self.pods_captured.clone(),
        );
        r.register(
            "ambit_pods_unserved",
            "Pods recorded as captured whose listeners could not be restored",
            self.pods_unserved.clone(),
        );
        r.register(
            "ambit_cni_requests",
            "Requests from ambit-cni by command and result",
            self.cni_requests.clone(),
        );
        r.register(
            "ambit_cni_handoff_seconds",
            "Time to serve a pod after its ADD arrived",
            self.handoff_seconds.clone(),
        );
        r.register(
            "ambit_rules_repaired",
            "In-pod redirect rules or routes found missing or altered and reinstalled",
            self.rules_repaired.clone(),
        );
        r.register(
            "ambit_pods_unprotected",
            "Pods whose redirect rules are missing and could not be reinstalled",
            self.pods_unprotected.clone(),
        );
        r.register(
            "ambit_certificate_expiry_timestamp_seconds",
            "Expiry of each identity's current certificate",
            self.cert_expiry.clone(),
        );
    }

    pub fn cni(&self, command: &str, ok: bool) {
        self.cni_requests
            .get_or_create(&CniLabels {
                command: command.into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }
}

/// The OpenMetrics exposition that prometheus-client writes, rewritten as Prometheus' text
/// format 0.0.4, for scrapers that do not ask for OpenMetrics (an `Accept` without
/// `application/openmetrics-text`, `promtool check metrics`, curl). prometheus-client encodes
/// OpenMetrics only, and the two differ where a text-format parser sees it: a counter family
/// is named without `_total` in OpenMetrics (`# TYPE istio_tcp_connections_opened counter`,
/// samples `..._total`) but with it in the text format, where HELP and TYPE must name the
/// sample; `# UNIT` and `# EOF` do not exist there. Everything else passes unchanged.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|t| t.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            // A counter's creation time has no place in the text format.
            None if counters.iter().any(|c| {
                line.strip_prefix(c)
                    .is_some_and(|r| r.starts_with("_created"))
            }) =>
            {
                continue;
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agent_metric_is_exported_with_its_labels() {
        let m = AgentMetrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        m.cni("ADD", true);
        m.handoff_seconds.observe(0.003);
        m.cert_expiry
            .get_or_create(&IdentityLabels {
                identity: "spiffe://td/ns/a/sa/b".into(),
            })
            .set(1.9e9);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for want in [
            "ambit_pods_captured 0",
            "ambit_cni_requests_total{command=\"ADD\",result=\"ok\"} 1",
            "ambit_cni_handoff_seconds_count 1",
            "ambit_certificate_expiry_timestamp_seconds{identity=\"spiffe://td/ns/a/sa/b\"} 1900000000",
        ] {
            assert!(out.contains(want), "{want:?} missing in\n{out}");
        }
    }

    #[test]
    fn the_text_format_names_counter_families_by_their_samples_and_drops_openmetrics_only_lines() {
        let m = AgentMetrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        m.cni("ADD", true);
        m.handoff_seconds.observe(0.003);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        assert!(om.contains("# TYPE ambit_cni_requests counter"), "{om}");
        let text = openmetrics_to_text(&om);
        for want in [
            "# HELP ambit_cni_requests_total ",
            "# TYPE ambit_cni_requests_total counter",
            "ambit_cni_requests_total{command=\"ADD\",result=\"ok\"} 1",
            "# TYPE ambit_pods_captured gauge",
            "# TYPE ambit_cni_handoff_seconds histogram",
            "ambit_cni_handoff_seconds_count 1",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }
        for gone in ["# EOF", "# UNIT", "# TYPE ambit_cni_requests counter"] {
            assert!(!text.contains(gone), "{gone:?} left in\n{text}");
        }
        let created = "# TYPE c counter\nc_total 1\nc_created 1.7e9\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(created),
            "# TYPE c_total counter\nc_total 1\n"
        );
    }
}
