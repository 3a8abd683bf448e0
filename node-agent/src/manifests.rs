//! A directory of Kubernetes manifests (YAML or JSON, several documents per file, `List`
//! objects too) as a source for the workload store. Polled: a change of any file's name, size
//! or modification time reloads the whole directory, and the store gets the new snapshot at
//! once. A file that does not parse is reported once (until it changes) and the rest still
//! load. Kinds: Pod, Namespace, AuthorizationPolicy, PeerAuthentication (see [`crate::policy`]),
//! Service and EndpointSlice (see [`crate::services`]); others are skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{Objects, Store};

/// One problem in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub message: String,
}

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    files
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok();
            (
                p.clone(),
                m.as_ref().map_or(0, |m| m.len()),
                m.and_then(|m| m.modified().ok()),
            )
        })
        .collect()
}

/// (namespace, name) of an object (namespace `default` when absent).
fn namespaced(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &str,
) -> Result<(String, String), String> {
    let name = meta
        .name
        .clone()
        .ok_or_else(|| format!("{kind} without metadata.name"))?;
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    Ok((ns, name))
}

fn add_object(
    value: serde_yaml_ng::Value,
    objects: &mut Objects,
    root_ns: &str,
    depth: usize,
) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    match kind.as_str() {
        "Pod" => {
            let pod = Pod::deserialize(value).map_err(|e| format!("Pod: {e}"))?;
            objects.pods.insert(namespaced(&pod.metadata, "Pod")?, pod);
        }
        "Namespace" => {
            let ns = Namespace::deserialize(value).map_err(|e| format!("Namespace: {e}"))?;
            let name = ns
                .metadata
                .name
                .clone()
                .ok_or("Namespace without metadata.name")?;
            objects.namespaces.insert(name, ns);
        }
        k if k.ends_with("List") && depth == 0 => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_object(item, objects, root_ns, depth + 1)?;
            }
        }
        "AuthorizationPolicy" => {
            let (policy, status) = crate::policy::authorization_policy(&value, root_ns);
            objects.policies.extend(policy.map(Arc::new));
            objects.statuses.push(status);
        }
        "PeerAuthentication" => {
            let (pa, status) = crate::policy::peer_authentication(&value, root_ns);
            objects.peer_auths.push(pa);
            objects.statuses.push(status);
        }
        "Service" => {
            let svc = Service::deserialize(value).map_err(|e| format!("Service: {e}"))?;
            let key = namespaced(&svc.metadata, "Service")?;
            if let Some(r) =
                crate::services::service_record(&svc).map_err(|e| format!("Service: {e}"))?
            {
                objects.services.insert(key, Arc::new(r));
            }
        }
        "EndpointSlice" => {
            let slice =
                EndpointSlice::deserialize(value).map_err(|e| format!("EndpointSlice: {e}"))?;
            let key = namespaced(&slice.metadata, "EndpointSlice")?;
            if let Some(r) =
                crate::services::slice_record(&slice).map_err(|e| format!("EndpointSlice: {e}"))?
            {
                objects.endpoint_slices.insert(key, Arc::new(r));
            }
        }
        "" => return Err("document without kind".into()),
        _ => {}
    }
    Ok(())
}

/// Reads every manifest of `dir`; returns what parsed and what did not. `root_ns` is the
/// namespace whose selector-less policies apply mesh-wide.
pub fn load(dir: &Path, root_ns: &str) -> (Objects, Vec<Problem>) {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    for file in manifest_files(dir) {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem {
                    file,
                    message: e.to_string(),
                });
                continue;
            }
        };
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let problem = |message: String| Problem {
                file: file.clone(),
                message: format!("document {}: {message}", i + 1),
            };
            let value = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    // A syntax error ends the file: the parser cannot resynchronise.
                    problems.push(problem(e.to_string()));
                    break;
                }
            };
            if !value.is_null()
                && let Err(message) = add_object(value, &mut objects, root_ns, 0)
            {
                problems.push(problem(message));
            }
        }
    }
    (objects, problems)
}

/// Loads `dir` into `store` now, then again whenever a file changes, until `stop`.
pub async fn watch(
    dir: PathBuf,
    root_ns: String,
    store: Arc<Store>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut seen: Option<Fingerprint> = None;
    let mut reported = report_statuses(&store.policy_statuses(), &Default::default());
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let fp = fingerprint(&manifest_files(&dir));
        if seen.as_ref() == Some(&fp) {
            continue;
        }
        let (objects, problems) = {
            let (dir, root_ns) = (dir.clone(), root_ns.clone());
            match tokio::task::spawn_blocking(move || load(&dir, &root_ns)).await {
                Ok(r) => r,
                Err(e) => {
                    warn!("loading manifests failed: {e}");
                    continue;
                }
            }
        };
        for p in &problems {
            warn!(file = %p.file.display(), "invalid manifest skipped: {}", p.message);
        }
        info!(
            dir = %dir.display(),
            pods = objects.pods.len(),
            namespaces = objects.namespaces.len(),
            services = objects.services.len(),
            endpoint_slices = objects.endpoint_slices.len(),
            invalid = problems.len(),
            "manifests loaded"
        );
        // The store first: once a status is logged, it is in force.
        let statuses = objects.statuses.clone();
        store.set_manifests(objects);
        reported = report_statuses(&statuses, &reported);
        seen = Some(fp);
    }
}

/// Logs each policy status not logged before (a status is logged once, until it changes);
/// returns the set now current.
pub fn report_statuses(
    statuses: &[crate::policy::Status],
    before: &std::collections::HashSet<String>,
) -> std::collections::HashSet<String> {
    use crate::policy::State;
    let mut now = std::collections::HashSet::new();
    for s in statuses {
        let line = s.to_string();
        if !before.contains(&line) {
            match s.state {
                State::Accepted => info!(kind = s.kind, policy = %s.key, "policy accepted"),
                State::Converted | State::Ignored => {
                    warn!(kind = s.kind, policy = %s.key, "{line}")
                }
                State::Rejected => warn!(kind = s.kind, policy = %s.key, "policy rejected: {line}"),
            }
        }
        now.insert(line);
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_multi_document_yaml_lists_and_json_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n\
             spec:\n  serviceAccountName: web\n  containers: []\n\
             status:\n  podIPs:\n  - ip: 10.9.0.4\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Pod","metadata":{"name":"db"},"spec":{"containers":[]}}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("c.yaml"), "kind: Pod\nmetadata: [1, 2\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let (objects, problems) = load(dir.path(), "istio-system");
        assert_eq!(objects.namespaces.len(), 1);
        let keys: Vec<_> = objects.pods.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("default".to_string(), "db".to_string()),
                ("shop".to_string(), "web".to_string())
            ]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].file.ends_with("c.yaml"));
    }
}
