//! A directory of Kubernetes manifests (YAML with several documents per file, or JSON with one;
//! `List` objects too) as a source for the workload store. Polled: a file whose size or
//! modification time changed (or that appeared) is read again, alone; the others' objects are
//! kept as they were converted, and the store gets the directory's new union at once (it
//! applies only what differs). A file that does not parse is reported once (until it changes)
//! and the rest still load. Kinds: Pod, Namespace, AuthorizationPolicy, PeerAuthentication (see [`crate::policy`]),
//! Service and EndpointSlice (see [`crate::services`]); others are skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::records::Context;
use crate::store::{Objects, Store};

/// One problem in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub message: String,
}

/// A file's size and modification time: a change to either reads it again.
type Stamp = (u64, Option<SystemTime>);

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

fn stamp(file: &Path) -> Stamp {
    let m = std::fs::metadata(file).ok();
    (
        m.as_ref().map_or(0, |m| m.len()),
        m.and_then(|m| m.modified().ok()),
    )
}

/// (namespace, name) of an object (namespace `default` when absent).
fn namespaced(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &str,
) -> Result<(String, String), String> {
    crate::records::key_of(meta).ok_or_else(|| format!("{kind} without metadata.name"))
}

/// One document of a manifest file: a YAML value, or the text of a JSON object (deserialized
/// straight into its type: at 10,000s of objects, a generic value tree per object was most of
/// the load's time and left the heap fragmented around the records that stay).
enum Doc<'a> {
    Yaml(serde_yaml_ng::Value),
    Json(&'a str),
}

/// What the JSON path reads first of a document: its kind, and a `List`'s items as text.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(default)]
    kind: String,
    #[serde(borrow, default)]
    items: Option<Vec<&'a serde_json::value::RawValue>>,
}

impl Doc<'_> {
    fn kind(&self) -> Result<String, String> {
        match self {
            Doc::Yaml(v) => Ok(v
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned()),
            Doc::Json(text) => serde_json::from_str::<Head>(text)
                .map(|h| h.kind)
                .map_err(|e| e.to_string()),
        }
    }

    fn typed<T: serde::de::DeserializeOwned>(self, kind: &str) -> Result<T, String> {
        match self {
            Doc::Yaml(v) => T::deserialize(v).map_err(|e| format!("{kind}: {e}")),
            Doc::Json(text) => serde_json::from_str(text).map_err(|e| format!("{kind}: {e}")),
        }
    }

    /// The items of a `List`.
    fn items(self) -> Result<Vec<Self>, String> {
        Ok(match self {
            Doc::Yaml(v) => v
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(Doc::Yaml)
                .collect(),
            Doc::Json(text) => serde_json::from_str::<Head>(text)
                .map_err(|e| e.to_string())?
                .items
                .unwrap_or_default()
                .into_iter()
                .map(|raw| Doc::Json(raw.get()))
                .collect(),
        })
    }
}

fn add_object(doc: Doc, objects: &mut Objects, cx: &Context, depth: usize) -> Result<(), String> {
    let kind = doc.kind()?;
    match kind.as_str() {
        "Pod" => {
            // Converted at once: only the record stays (see crate::records).
            let pod: Pod = doc.typed("Pod")?;
            let record = crate::records::pod_record(&pod, cx.node.as_deref())
                .ok_or("Pod without metadata.name")?;
            objects.add_pod(record);
        }
        "Namespace" => {
            let ns: Namespace = doc.typed("Namespace")?;
            let (name, labels) =
                crate::records::namespace_record(&ns).ok_or("Namespace without metadata.name")?;
            objects.namespaces.insert(name, labels);
        }
        k if k.ends_with("List") && depth == 0 => {
            for item in doc.items()? {
                add_object(item, objects, cx, depth + 1)?;
            }
        }
        "AuthorizationPolicy" => {
            let value: serde_yaml_ng::Value = doc.typed(&kind)?;
            let (policy, status) = crate::policy::authorization_policy(&value, &cx.root_namespace);
            objects.policies.extend(policy.map(Arc::new));
            objects.statuses.push(status);
        }
        "PeerAuthentication" => {
            let value: serde_yaml_ng::Value = doc.typed(&kind)?;
            let (pa, status) = crate::policy::peer_authentication(&value, &cx.root_namespace);
            objects.peer_auths.push(pa);
            objects.statuses.push(status);
        }
        "Service" => {
            let svc: Service = doc.typed("Service")?;
            let key = namespaced(&svc.metadata, "Service")?;
            if let Some(r) =
                crate::services::service_record(&svc).map_err(|e| format!("Service: {e}"))?
            {
                objects.services.insert(key, Arc::new(r));
            }
        }
        "EndpointSlice" => {
            let slice: EndpointSlice = doc.typed("EndpointSlice")?;
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

/// Reads one manifest file: what parsed and what did not.
fn load_file(file: &Path, cx: &Context) -> (Objects, Vec<Problem>) {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            problems.push(Problem {
                file: file.to_owned(),
                message: e.to_string(),
            });
            return (objects, problems);
        }
    };
    if file.extension().is_some_and(|e| e == "json") {
        // One JSON document per file.
        if let Err(message) = add_object(Doc::Json(&text), &mut objects, cx, 0) {
            problems.push(Problem {
                file: file.to_owned(),
                message,
            });
        }
        return (objects, problems);
    }
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let problem = |message: String| Problem {
            file: file.to_owned(),
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
            && let Err(message) = add_object(Doc::Yaml(value), &mut objects, cx, 0)
        {
            problems.push(problem(message));
        }
    }
    (objects, problems)
}

/// One file as last read.
struct File {
    stamp: Stamp,
    objects: Objects,
    problems: Vec<Problem>,
}

/// A manifests directory as last read, file by file.
pub struct Directory {
    dir: PathBuf,
    cx: Context,
    files: BTreeMap<PathBuf, File>,
}

impl Directory {
    /// Reads every manifest of `dir`.
    pub fn read(dir: &Path, cx: Context) -> Self {
        let mut d = Self {
            dir: dir.to_owned(),
            cx,
            files: BTreeMap::new(),
        };
        d.refresh();
        d
    }

    /// Reads again the files that changed or appeared, forgets those gone; returns how many
    /// files that concerned (0: nothing changed).
    pub fn refresh(&mut self) -> usize {
        let now = manifest_files(&self.dir);
        let before = self.files.len();
        self.files.retain(|p, _| now.contains(p));
        let mut changed = before - self.files.len();
        for path in now {
            // Stamped before reading: a change during the read is read again next time.
            let stamp = stamp(&path);
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let (objects, problems) = load_file(&path, &self.cx);
            self.files.insert(
                path,
                File {
                    stamp,
                    objects,
                    problems,
                },
            );
            changed += 1;
        }
        changed
    }

    /// Manifest files read.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The union of every file (in name order: a later file wins for an object both define),
    /// and every file's problems.
    pub fn objects(&self) -> (Objects, Vec<Problem>) {
        let mut out = Objects::default();
        let mut problems = Vec::new();
        for f in self.files.values() {
            out.extend_from(&f.objects, true);
            problems.extend(f.problems.iter().cloned());
        }
        (out, problems)
    }
}

/// Reads every manifest of `dir`; returns what parsed and what did not.
pub fn load(dir: &Path, cx: Context) -> (Objects, Vec<Problem>) {
    Directory::read(dir, cx).objects()
}

/// Loads changed files of `loaded` into `store` whenever a file changes, until `stop`.
pub async fn watch(
    mut loaded: Directory,
    store: Arc<Store>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut reported = report_statuses(&store.policy_statuses(), &Default::default());
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Reading, parsing and the store's update run off the runtime threads. The store
        // first: once a status is logged, it is in force.
        let store = store.clone();
        let done = tokio::task::spawn_blocking(move || {
            let files = loaded.refresh();
            if files == 0 {
                return (loaded, None);
            }
            let (objects, problems) = loaded.objects();
            let statuses = objects.statuses.clone();
            apply_loaded(&store, &loaded.dir, objects, &problems, files);
            (loaded, Some(statuses))
        });
        match done.await {
            Ok((l, statuses)) => {
                loaded = l;
                if let Some(statuses) = statuses {
                    reported = report_statuses(&statuses, &reported);
                }
            }
            Err(e) => {
                tracing::error!("the manifests watch stopped (changes are no longer read): {e}");
                return;
            }
        }
    }
}

/// Applies a load (`files` read) to the store, then logs what it found: each invalid file,
/// then the counts. The counts line comes after the store has the objects, so whoever reads
/// it (an operator, a test) can rely on them being in effect.
pub fn apply_loaded(
    store: &Store,
    dir: &Path,
    objects: Objects,
    problems: &[Problem],
    files: usize,
) {
    for p in problems {
        warn!(file = %p.file.display(), "invalid manifest skipped: {}", p.message);
    }
    let (pods, namespaces, services, endpoint_slices) = (
        objects.pods.len(),
        objects.namespaces.len(),
        objects.services.len(),
        objects.endpoint_slices.len(),
    );
    store.set_manifests(objects);
    info!(
        dir = %dir.display(),
        pods,
        namespaces,
        services,
        endpoint_slices,
        invalid = problems.len(),
        files_read = files,
        "manifests loaded"
    );
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
        let (objects, problems) = load(
            dir.path(),
            Context {
                root_namespace: "istio-system".into(),
                node: None,
            },
        );
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

    #[test]
    fn json_files_load_typed_objects_lists_and_policies_and_report_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("svc.json"),
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop"},
                 "spec":{"clusterIP":"10.96.0.7","ports":[{"name":"http","port":80,"targetPort":"http"}]}},
                {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
                 "metadata":{"name":"web-1","namespace":"shop","labels":{"kubernetes.io/service-name":"web"}},
                 "addressType":"IPv4","ports":[{"name":"http","port":8080}],
                 "endpoints":[{"addresses":["10.9.0.4"]}]},
                {"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy",
                 "metadata":{"name":"deny-all","namespace":"shop"},"spec":{}}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.8, ports: [{port: 5432}]}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("broken.json"),
            r#"{"kind": "Pod", "metadata": "#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bad-item.json"),
            r#"{"kind":"List","items":[{"kind":"Service","metadata":{"name":"x"},"spec":{"clusterIP":"nope"}}]}"#,
        )
        .unwrap();
        let (objects, problems) = load(
            dir.path(),
            Context {
                root_namespace: "istio-system".into(),
                node: None,
            },
        );
        let services: Vec<_> = objects.services.keys().cloned().collect();
        assert_eq!(
            services,
            vec![
                ("shop".to_string(), "db".to_string()),
                ("shop".to_string(), "web".to_string())
            ]
        );
        assert_eq!(objects.endpoint_slices.len(), 1);
        assert_eq!(objects.statuses.len(), 1, "the policy in the JSON list");
        let mut files: Vec<String> = problems
            .iter()
            .map(|p| p.file.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["bad-item.json", "broken.json"], "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("\"nope\" is not an IP address")),
            "{problems:?}"
        );
    }
}
