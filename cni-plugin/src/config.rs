//! Parse-then-validate for everything the runtime hands the plugin: the CNI_* environment and
//! the network configuration on stdin (with `prevResult` and `runtimeConfig`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

pub use crate::error::SUPPORTED_VERSIONS;
use crate::error::{CniError, code};

pub use ambit_common::enrollment::{CAPTURE_ANNOTATION, Enrollment};
/// The runtimeConfig key under which CRI runtimes pass pod annotations.
pub const POD_ANNOTATIONS_CAP: &str = "io.kubernetes.cri.pod-annotations";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The CNI_* environment, read from any map (tests never touch the process environment).
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl CniEnv {
    pub fn from_vars<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut env = Self::default();
        for (k, v) in vars {
            let v = Some(v.to_string());
            match k {
                "CNI_COMMAND" => env.command = v,
                "CNI_CONTAINERID" => env.container_id = v,
                "CNI_NETNS" => env.netns = v,
                "CNI_IFNAME" => env.ifname = v,
                "CNI_ARGS" => env.args = v,
                "CNI_PATH" => env.path = v,
                _ => {}
            }
        }
        env
    }

    pub fn command(&self) -> Result<Command, CniError> {
        match self.command.as_deref() {
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("STATUS") => Ok(Command::Status),
            Some("GC") => Ok(Command::Gc),
            Some("VERSION") => Ok(Command::Version),
            Some(other) => Err(CniError::new(
                code::INVALID_ENV,
                "unknown CNI_COMMAND",
                format!("CNI_COMMAND={other:?}; expected ADD, DEL, CHECK, STATUS, GC or VERSION"),
            )),
            None => Err(CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set",
                "the runtime must set CNI_COMMAND",
            )),
        }
    }

    /// CNI_CONTAINERID: required, starts alphanumeric, then alphanumerics, `_`, `.`, `-`.
    pub fn container_id(&self) -> Result<String, CniError> {
        let id = non_empty(&self.container_id).ok_or_else(|| missing("CNI_CONTAINERID"))?;
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return Err(CniError::new(
                code::INVALID_ENV,
                "invalid CNI_CONTAINERID",
                format!(
                    "CNI_CONTAINERID={id:?} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
                ),
            ));
        }
        Ok(id.to_string())
    }

    pub fn netns(&self) -> Option<&str> {
        non_empty(&self.netns)
    }

    pub fn ifname(&self) -> Result<String, CniError> {
        non_empty(&self.ifname)
            .map(str::to_string)
            .ok_or_else(|| missing("CNI_IFNAME"))
    }

    /// CNI_ARGS as `K=V;K=V`.
    pub fn args(&self) -> Result<HashMap<String, String>, CniError> {
        let mut out = HashMap::new();
        let Some(raw) = non_empty(&self.args) else {
            return Ok(out);
        };
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    out.insert(k.to_string(), v.to_string());
                }
                _ => {
                    return Err(CniError::new(
                        code::INVALID_ENV,
                        "malformed CNI_ARGS",
                        format!("CNI_ARGS pair {pair:?} is not KEY=VALUE (whole value: {raw:?})"),
                    ));
                }
            }
        }
        Ok(out)
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

fn missing(var: &str) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("{var} is not set"),
        format!("the runtime must set {var} for this command"),
    )
}

/// How Kubernetes pods are chosen for capture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrollmentMode {
    /// Every pod of a namespace not excluded (and, if `includeNamespaces` is set, included).
    #[default]
    All,
    /// Pods whose namespace or own labels say so (`ambit.dev/dataplane-mode=enabled`), as
    /// the agent knows them from the API server or its manifests directory.
    Labels,
}

/// What to do with containers that carry no Kubernetes pod namespace (podman, ctr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonKubernetes {
    /// Capture them like pods of namespace `default` (fail closed: the safe default).
    #[default]
    Capture,
    /// Pass them through uncaptured.
    Skip,
}

fn default_socket() -> PathBuf {
    ambit_common::DEFAULT_AGENT_SOCKET.into()
}
fn default_timeout() -> f64 {
    10.0
}
fn default_agent_namespace() -> String {
    "ambit-system".into()
}
fn default_agent_prefix() -> String {
    "ambit-agent-".into()
}
fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}
fn default_probes() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(ambit_common::redirect::DEFAULT_PROBE_V4),
        IpAddr::V6(ambit_common::redirect::DEFAULT_PROBE_V6),
    ]
}
fn default_level() -> String {
    "warn".into()
}

/// The plugin's entry in the conflist, as libcni hands it over.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    /// Bound on the wait for the agent's ack, in seconds.
    #[serde(default = "default_timeout")]
    pub agent_timeout_seconds: f64,
    #[serde(default = "default_agent_namespace")]
    pub agent_namespace: String,
    #[serde(default = "default_agent_prefix")]
    pub agent_pod_prefix: String,
    /// Namespaces never captured (unless a pod opts in by annotation).
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// When non-empty, only these namespaces are captured (unless a pod opts in).
    #[serde(default)]
    pub include_namespaces: Vec<String>,
    #[serde(default)]
    pub non_kubernetes: NonKubernetes,
    #[serde(default)]
    pub enrollment: EnrollmentMode,
    /// Kubelet-probe source addresses exempted from inbound capture.
    #[serde(default = "default_probes")]
    pub probe_sources: Vec<IpAddr>,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default = "default_level")]
    pub log_level: String,
    #[serde(default)]
    pub log_stderr: Option<bool>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin and validates every field; errors name the key and value.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            let (c, msg) = if e.is_data() {
                (code::INVALID_CONFIG, "invalid network configuration")
            } else {
                (code::DECODE, "cannot decode the network configuration")
            };
            CniError::new(c, msg, format!("stdin: {e}"))
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "cniVersion {:?} is not supported; ambit-cni supports {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let invalid = |key: &str, why: String| {
            CniError::new(code::INVALID_CONFIG, format!("invalid {key}"), why)
                .in_version(&conf.cni_version)
        };
        if !(conf.agent_timeout_seconds > 0.0 && conf.agent_timeout_seconds <= 300.0) {
            return Err(invalid(
                "agentTimeoutSeconds",
                format!(
                    "agentTimeoutSeconds={} must be > 0 and <= 300",
                    conf.agent_timeout_seconds
                ),
            ));
        }
        if conf.log_level.parse::<log::LevelFilter>().is_err() {
            return Err(invalid(
                "logLevel",
                format!(
                    "logLevel={:?}; expected off, error, warn, info, debug or trace",
                    conf.log_level
                ),
            ));
        }
        Ok(conf)
    }

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.agent_timeout_seconds)
    }

    /// The pod IPs from `prevResult`; ADD requires a prevResult (the plugin is chained).
    pub fn prev_result_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let bad = |why: String| {
            CniError::new(code::INVALID_CONFIG, "invalid prevResult", why)
                .in_version(&self.cni_version)
        };
        let prev = self.prev_result.as_ref().ok_or_else(|| {
            bad("prevResult is missing: ambit-cni is a chained plugin and must come after the primary plugin (e.g. bridge) in the conflist".into())
        })?;
        let obj = prev
            .as_object()
            .ok_or_else(|| bad(format!("prevResult must be an object, got {prev}")))?;
        let mut ips = Vec::new();
        if let Some(list) = obj.get("ips") {
            let list = list
                .as_array()
                .ok_or_else(|| bad(format!("prevResult.ips must be a list, got {list}")))?;
            for (i, entry) in list.iter().enumerate() {
                let addr = entry
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("prevResult.ips[{i}].address is missing")))?;
                let ip = addr
                    .split('/')
                    .next()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "prevResult.ips[{i}].address={addr:?} is not an IP/prefix"
                        ))
                    })?;
                ips.push(ip);
            }
        }
        Ok(ips)
    }

    /// The result to print for ADD: prevResult unchanged, in the request's version.
    pub fn result(&self) -> Value {
        let mut out = self
            .prev_result
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default()));
        if let Some(obj) = out.as_object_mut() {
            obj.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        }
        out
    }

    /// Pod annotations passed by CRI runtimes through runtimeConfig.
    pub fn pod_annotations(&self) -> BTreeMap<String, String> {
        self.runtime_config
            .as_ref()
            .and_then(|rc| rc.get(POD_ANNOTATIONS_CAP))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn probe_v4(&self) -> Vec<Ipv4Addr> {
        self.probe_sources
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    pub fn probe_v6(&self) -> Vec<Ipv6Addr> {
        self.probe_sources
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                IpAddr::V4(_) => None,
            })
            .collect()
    }
}

/// Kubernetes facts from CNI_ARGS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

impl PodArgs {
    pub fn from_args(args: &HashMap<String, String>) -> Self {
        let get = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
        Self {
            namespace: get("K8S_POD_NAMESPACE"),
            name: get("K8S_POD_NAME"),
            uid: get("K8S_POD_UID"),
        }
    }
}

/// Decides enrollment. Order: the agent's own pods are never captured; then a pod annotation
/// (`ambit.dev/capture: enabled|disabled`) wins; then the namespace lists; then, with
/// `"enrollment": "labels"`, the labels (asked of the agent); then the non-Kubernetes setting. Host-network pods (no namespace of their own) are skipped later,
/// once the namespace is opened.
pub fn enrollment(
    conf: &NetConf,
    pod: &PodArgs,
    annotations: &BTreeMap<String, String>,
) -> Enrollment {
    if pod.namespace.as_deref() == Some(conf.agent_namespace.as_str())
        && pod
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with(&conf.agent_pod_prefix))
    {
        return Enrollment::Skip("the agent's own pod");
    }
    match annotations.get(CAPTURE_ANNOTATION).map(String::as_str) {
        Some("enabled" | "true") => return Enrollment::Capture("pod annotation opts in"),
        Some("disabled" | "false") => return Enrollment::Skip("pod annotation opts out"),
        _ => {}
    }
    match &pod.namespace {
        Some(ns) => {
            if conf.exclude_namespaces.iter().any(|x| x == ns) {
                Enrollment::Skip("namespace excluded")
            } else if !conf.include_namespaces.is_empty()
                && !conf.include_namespaces.iter().any(|x| x == ns)
            {
                Enrollment::Skip("namespace not included")
            } else if conf.enrollment == EnrollmentMode::Labels {
                // The pod's and its namespace's labels decide: ask the agent.
                Enrollment::Undecided
            } else {
                Enrollment::Capture("namespace enrolled")
            }
        }
        None => match conf.non_kubernetes {
            NonKubernetes::Capture => {
                Enrollment::Capture("non-Kubernetes container, nonKubernetes=capture")
            }
            NonKubernetes::Skip => Enrollment::Skip("non-Kubernetes container, nonKubernetes=skip"),
        },
    }
}

#[cfg(test)]
mod tests;
