//! The one question the installer asks the API server: on exit, is this an uninstall (the
//! DaemonSet is gone or being deleted) or an upgrade/restart (it is still there)? Only an
//! uninstall removes the plugin; on an upgrade the plugin stays chained, so pods created
//! before the new agent is ready wait for it (the plugin fails their ADD) instead of starting
//! uncaptured.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use kube::api::{Patch, PatchParams};

pub use ambit_common::enrollment::NOT_READY_TAINT;

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

/// The node's taints without `key`; `None` when it has no such taint.
pub fn without_taint(node: &Node, key: &str) -> Option<Vec<Taint>> {
    let taints = node.spec.as_ref()?.taints.as_ref()?;
    if !taints.iter().any(|t| t.key == key) {
        return None;
    }
    Some(taints.iter().filter(|t| t.key != key).cloned().collect())
}

/// Removes taint `key` from node `name`. The patch carries the resourceVersion it was computed
/// from, so a concurrent change of the node's taints makes it fail (409) instead of being
/// overwritten; the caller retries. Returns whether a taint was removed.
pub async fn untaint(client: kube::Client, name: &str, key: &str) -> Result<bool, kube::Error> {
    let api: Api<Node> = Api::all(client);
    let node = api.get(name).await?;
    let Some(rest) = without_taint(&node, key) else {
        return Ok(false);
    };
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": node.metadata.resource_version},
        "spec": {"taints": rest},
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(taints: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "resourceVersion": "42"},
            "spec": {"taints": taints}
        }))
        .unwrap()
    }

    #[test]
    fn only_our_taint_is_removed() {
        let n = node(serde_json::json!([
            {"key": NOT_READY_TAINT, "effect": "NoSchedule"},
            {"key": "dedicated", "value": "gpu", "effect": "NoExecute"}
        ]));
        let rest = without_taint(&n, NOT_READY_TAINT).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].key, "dedicated");
        assert_eq!(
            without_taint(&node(serde_json::json!([])), NOT_READY_TAINT),
            None
        );
    }

    /// Against an in-process API double: GET the node, PATCH with the precondition.
    #[tokio::test]
    async fn untaint_patches_with_the_resource_version_it_read() {
        use std::sync::{Arc, Mutex};
        let patches: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Default::default();
        let seen = patches.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let seen = seen.clone();
            async move {
                use http_body_util::BodyExt;
                let path = req.uri().path().to_owned();
                let body = if req.method() == http::Method::PATCH {
                    let b = req.into_body().collect().await.unwrap().to_bytes();
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                    seen.lock().unwrap().push((path, v));
                    serde_json::json!({"metadata": {"name": "n1"}})
                } else {
                    serde_json::json!({
                        "apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": "n1", "resourceVersion": "42"},
                        "spec": {"taints": [
                            {"key": NOT_READY_TAINT, "effect": "NoSchedule"},
                            {"key": "dedicated", "value": "gpu", "effect": "NoExecute"}
                        ]}
                    })
                };
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(200)
                        .body(http_body_util::Full::new(bytes::Bytes::from(
                            body.to_string(),
                        )))
                        .unwrap(),
                )
            }
        });
        let client = kube::Client::new(svc, "default");
        assert!(untaint(client, "n1", NOT_READY_TAINT).await.unwrap());
        let p = patches.lock().unwrap().clone();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "/api/v1/nodes/n1");
        assert_eq!(p[0].1["metadata"]["resourceVersion"], "42");
        assert_eq!(
            p[0].1["spec"]["taints"],
            serde_json::json!([{"key": "dedicated", "value": "gpu", "effect": "NoExecute"}])
        );
    }

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
