//! The one question the installer asks the API server: on exit, is this an uninstall (the
//! DaemonSet is gone or being deleted) or an upgrade/restart (it is still there)? Only an
//! uninstall removes the plugin; on an upgrade the plugin stays chained, so pods created
//! before the new agent is ready wait for it (the plugin fails their ADD) instead of starting
//! uncaptured.

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

/// What the DaemonSet's state means for the plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    Uninstall,
    Keep,
}

/// Pure decision: `None` = the DaemonSet does not exist.
pub fn decide(ds: Option<&DaemonSet>) -> OnExit {
    match ds {
        None => OnExit::Uninstall,
        Some(d) if d.metadata.deletion_timestamp.is_some() => OnExit::Uninstall,
        Some(_) => OnExit::Keep,
    }
}

/// Looks the DaemonSet up. Any error (API unreachable, no permission) is returned: the caller
/// keeps everything in place, the fail-closed choice.
pub async fn lookup(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<OnExit, kube::Error> {
    let api: Api<DaemonSet> = Api::namespaced(client, namespace);
    Ok(decide(api.get_opt(name).await?.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_or_deleted_daemonset_means_uninstall() {
        assert_eq!(decide(None), OnExit::Uninstall);
        let mut ds: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ambit-agent", "namespace": "ambit-system"}
        }))
        .unwrap();
        assert_eq!(decide(Some(&ds)), OnExit::Keep);
        ds.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-27T00:00:00Z".parse().unwrap(),
            ));
        assert_eq!(decide(Some(&ds)), OnExit::Uninstall);
    }
}
