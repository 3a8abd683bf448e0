//! Which pods Ambit captures: the Kubernetes names involved (one home for all of them) and the
//! decision's vocabulary, shared by the plugin, which decides from its configuration and the
//! pod's annotations, and the agent, which decides by labels when the plugin asks it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Pod annotation: `enabled` captures the pod whatever its namespace, `disabled` never does.
pub const CAPTURE_ANNOTATION: &str = "ambit.dev/capture";

/// Pod and namespace label deciding enrollment when the plugin runs with
/// `"enrollment": "labels"`: `enabled` on the namespace enrolls its pods; on a pod, `enabled`
/// enrolls it wherever it is and `disabled` (or `none`) keeps it out.
pub const ENROLLMENT_LABEL: &str = "ambit.dev/dataplane-mode";

/// Set on a Pod by the agent that captured it (in a manifests directory the operator sets
/// it): the pod serves HBONE on 15008. Only such pods of other nodes get HBONE — a pod that
/// is not captured would refuse it.
pub const REDIRECTION_ANNOTATION: &str = "ambit.dev/redirection";

/// Node taint the installer removes once the node's agent serves: pods scheduled before that
/// would start uncaptured.
pub const NOT_READY_TAINT: &str = "ambit.dev/agent-not-ready";

/// Whether a pod is captured, and why (logged with every decision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrollment {
    Capture(&'static str),
    Skip(&'static str),
    /// What this side knows cannot decide: the plugin asks the agent (the pod's labels
    /// decide); the agent does not know the Pod object yet (and answers an error until it
    /// does, so the pod does not start: fail closed).
    Undecided,
}

/// The decision by labels: the pod's own [`ENROLLMENT_LABEL`] wins, then its namespace's.
pub fn by_labels(
    pod: Option<&BTreeMap<String, String>>,
    namespace: Option<&BTreeMap<String, String>>,
) -> Enrollment {
    fn label(l: Option<&BTreeMap<String, String>>) -> Option<&str> {
        l.and_then(|l| l.get(ENROLLMENT_LABEL)).map(String::as_str)
    }
    match label(pod) {
        Some("enabled") => {
            return Enrollment::Capture("pod label ambit.dev/dataplane-mode=enabled");
        }
        Some("disabled" | "none") => {
            return Enrollment::Skip("pod label ambit.dev/dataplane-mode opts out");
        }
        _ => {}
    }
    match label(namespace) {
        Some("enabled") => Enrollment::Capture("namespace label ambit.dev/dataplane-mode=enabled"),
        _ => Enrollment::Skip(
            "neither the pod nor its namespace is labelled ambit.dev/dataplane-mode=enabled",
        ),
    }
}

/// The agent's answer to [`crate::protocol::Request::Enrollment`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub capture: bool,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: &str) -> BTreeMap<String, String> {
        [(ENROLLMENT_LABEL.to_string(), v.to_string())].into()
    }

    #[test]
    fn the_pod_label_wins_over_the_namespace_label() {
        let on = labels("enabled");
        let off = labels("disabled");
        let none = labels("none");
        assert!(matches!(by_labels(Some(&on), None), Enrollment::Capture(_)));
        assert!(matches!(
            by_labels(Some(&off), Some(&on)),
            Enrollment::Skip(_)
        ));
        assert!(matches!(
            by_labels(Some(&none), Some(&on)),
            Enrollment::Skip(_)
        ));
        assert!(matches!(by_labels(None, Some(&on)), Enrollment::Capture(_)));
        assert!(matches!(
            by_labels(Some(&on), Some(&off)),
            Enrollment::Capture(_)
        ));
        assert!(matches!(by_labels(None, Some(&off)), Enrollment::Skip(_)));
        assert!(matches!(by_labels(None, None), Enrollment::Skip(_)));
    }
}
