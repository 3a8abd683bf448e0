//! The agent's configuration: one optional YAML file (`--config`), environment variables and
//! flags, in increasing order of precedence. Every key of the file is a long flag name
//! (`trust-domain: cluster1`); all three go through the same parsers, and a bad key or value is
//! reported with its source, its name and its value. Invalid configuration exits with 64
//! (EX_USAGE).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

/// Exit code for an invalid configuration (sysexits EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--help` / `--version`: not an error, print and exit 0.
    #[error("{0}")]
    Info(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Parser)]
// A flag given twice takes its last value (a wrapper's defaults, then the operator's).
#[command(
    name = "ambit-agent",
    version,
    about = "Ambit node agent",
    args_override_self = true
)]
pub struct Config {
    /// YAML file of settings (keys are the long flag names); flags and environment win.
    #[arg(long, env = "AMBIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "AMBIT_METRICS_ADDRESS", default_value = "0.0.0.0:15020")]
    pub metrics_address: SocketAddr,
    /// Readiness probe (`/healthz/ready`).
    #[arg(long, env = "AMBIT_READINESS_ADDRESS", default_value = "0.0.0.0:15021")]
    pub readiness_address: SocketAddr,
    /// Admin endpoint (`/config_dump`, `/logging`); loopback only.
    #[arg(long, env = "AMBIT_ADMIN_ADDRESS", default_value = "127.0.0.1:15000")]
    pub admin_address: SocketAddr,
    /// On SIGTERM, how long open connections may finish before they are cut, e.g. 20s.
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_drain)]
    pub drain_timeout: Duration,
    /// Unix socket the CNI plugin connects to (created mode 0600).
    #[arg(long, env = "AMBIT_SOCKET", default_value = ambit_common::DEFAULT_AGENT_SOCKET)]
    pub socket: PathBuf,
    /// Directory holding the record of captured pods.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/run/ambit/state")]
    pub state_dir: PathBuf,
    /// UIDs allowed to talk to the plugin socket (checked with SO_PEERCRED).
    #[arg(
        long = "allow-uid",
        env = "AMBIT_ALLOW_UIDS",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub allow_uids: Vec<u32>,
    /// Seconds between checks that every captured pod's namespace still exists.
    #[arg(long, env = "AMBIT_RECONCILE_SECONDS", default_value_t = 5.0)]
    pub reconcile_seconds: f64,
    /// Seconds between checks of every pod's in-pod rules (missing or altered ones are
    /// reinstalled).
    #[arg(long, env = "AMBIT_VERIFY_SECONDS", default_value_t = 10.0)]
    pub verify_seconds: f64,
    /// SPIFFE trust domain of this mesh's identities.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: String,
    /// Lifetime of workload certificates (renewed at half-life), e.g. 24h, 90m, 10s.
    #[arg(long, env = "AMBIT_CERT_LIFETIME", default_value = "24h", value_parser = parse_lifetime)]
    pub cert_lifetime: Duration,
    /// Plug-in CA certificate (PEM); without it the agent uses its embedded CA, generated once
    /// in the state directory.
    #[arg(long, env = "AMBIT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert (PEM).
    #[arg(long, env = "AMBIT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Certificates above --ca-cert up to the root (PEM), when --ca-cert is an intermediate.
    #[arg(long, env = "AMBIT_CA_CHAIN", requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// Directory of Kubernetes manifests (Pods, Namespaces) feeding the workload store.
    #[arg(long, env = "AMBIT_MANIFESTS_DIR")]
    pub manifests_dir: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster service account, or $KUBECONFIG) for Pods,
    /// Namespaces and policies, and annotate captured pods: --kubernetes=true.
    #[arg(long, env = "AMBIT_KUBERNETES", default_value_t = false, action = clap::ArgAction::Set)]
    pub kubernetes: bool,
    /// Namespace whose policies without selector apply to the whole mesh.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// This node's name, as Kubernetes knows it (EndpointSlice `nodeName`): Services with
    /// `internalTrafficPolicy: Local` or `trafficDistribution: PreferSameNode` use the
    /// endpoints on this node; only this node's pods keep their labels (enrollment and
    /// policy selectors are decided on the pod's node). The DaemonSet sets it from
    /// `spec.nodeName`.
    #[arg(long, env = "AMBIT_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone, for `trafficDistribution: PreferClose`; when unset, the zone of an
    /// endpoint on this node.
    #[arg(long, env = "AMBIT_NODE_ZONE")]
    pub node_zone: Option<String>,
    /// The cluster's DNS domain (Service hostnames in the access log and metrics).
    #[arg(long, env = "AMBIT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The cluster's Service (ClusterIP) ranges, e.g. 10.96.0.0/12,fd00:10:96::/112: a
    /// connection to an address in them that is no Service the agent knows (yet) is reset
    /// instead of leaving the pod in plaintext for kube-proxy to deliver.
    #[arg(
        long = "service-cidr",
        env = "AMBIT_SERVICE_CIDRS",
        value_delimiter = ','
    )]
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Seconds between checks of --manifests-dir for changes.
    #[arg(long, env = "AMBIT_MANIFESTS_POLL_SECONDS", default_value_t = 1.0)]
    pub manifests_poll_seconds: f64,
    /// A pooled HBONE connection without streams for this long is closed, e.g. 5m.
    #[arg(long, env = "AMBIT_POOL_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_lifetime)]
    pub pool_idle_timeout: Duration,
    /// Serve inbound connections to a captured pod that the workload source (Kubernetes or
    /// --manifests-dir) does not know, as if it had no labels. Default: refused — its labels
    /// and service account, which policies select on, cannot be checked.
    #[arg(long, env = "AMBIT_ALLOW_UNKNOWN_PODS")]
    pub allow_unknown_pods: bool,
    /// An inbound HBONE connection (port 15008) without streams for this long is closed, e.g.
    /// 10m; keep it above peers' --pool-idle-timeout so clients close first.
    #[arg(long, env = "AMBIT_INBOUND_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_lifetime)]
    pub inbound_idle_timeout: Duration,
    /// Idle pooled connections to a destination beyond the first close after this (capped
    /// at --pool-idle-timeout): connections a burst opened do not linger with its memory.
    #[arg(long, env = "AMBIT_POOL_SURPLUS_IDLE_TIMEOUT", default_value = "10s", value_parser = parse_lifetime)]
    pub pool_surplus_idle_timeout: Duration,
    /// Receive buffer (KiB) of the agent's sockets facing an app in its own pod; 0 = kernel
    /// autotuning. Bounds what 1,000s of busy connections queue in the kernel, so the host
    /// stays under net.ipv4.tcp_mem pressure (see docs/troubleshooting.md).
    #[arg(long, env = "AMBIT_APP_RECEIVE_BUFFER_KIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=65536))]
    pub app_receive_buffer_kib: u32,
    /// TCP congestion control of the same sockets (facing an app in its own pod), or
    /// `default` to keep the pod's. Pacing congestion controls (BBR, many nodes' default)
    /// cost a timer per burst to a peer microseconds away; the agent's sockets facing the
    /// network keep the pod's choice. An algorithm the kernel lacks is reported at startup
    /// and the pod's default kept.
    #[arg(long, env = "AMBIT_APP_CONGESTION_CONTROL", default_value = "cubic", value_parser = parse_congestion_control)]
    pub app_congestion_control: CongestionControl,
    /// TCP congestion control of the agent's HBONE sockets (both ends), or `default` for the
    /// pod's, as the app's own connection would have had. Choosing one (e.g. cubic on a node
    /// whose default is BBR) trades the network behaviour of the pod's default for the CPU its
    /// pacing costs; see ARCHITECTURE.md.
    #[arg(long, env = "AMBIT_HBONE_CONGESTION_CONTROL", default_value = "default", value_parser = parse_congestion_control)]
    pub hbone_congestion_control: CongestionControl,
    /// Deliver HBONE traffic between two pods of this node socket to socket in the kernel
    /// (sk_msg on a sockhash) instead of through both pods' TCP stacks and the bridge; the
    /// bytes are the same TLS records. Off, or where the kernel refuses (no
    /// CONFIG_BPF_STREAM_PARSER, no CAP_BPF), same-node HBONE goes over TCP. With it on, a
    /// capture on the node sees a same-node connection's TCP handshake and ClientHello only.
    #[arg(long, env = "AMBIT_SAME_NODE_SHORTCUT", default_value_t = true, action = clap::ArgAction::Set)]
    pub same_node_shortcut: bool,
    /// Runtime worker threads serving every pod (default: one per CPU, at most 4).
    #[arg(long, env = "AMBIT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: Option<u16>,
    /// Microseconds a data-path thread with nothing to do polls for new events before it
    /// sleeps; 0 = it sleeps at once. Saves a wake-up per hop when the next chunk follows
    /// within that time (on virtual machines whose idle vCPUs halt, a costly one), for at
    /// most that much CPU per sleep.
    #[arg(long, env = "AMBIT_WORKER_SPIN_US", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub worker_spin_us: u32,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log: String,
    /// Log format: plain or json.
    #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
}

fn parse_drain(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

fn parse_trust_domain(s: &str) -> Result<String, String> {
    ambit_proxy::identity::Identity::parse(&format!("spiffe://{s}/ns/n/sa/s"))
        .map(|id| id.trust_domain().to_owned())
        .map_err(|_| format!("{s:?} is not a trust domain (letters, digits, '-', '.', '_')"))
}

/// `--app-congestion-control` and `--hbone-congestion-control`: a kernel algorithm's name, or
/// the pod namespace's default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CongestionControl {
    PodDefault,
    Named(String),
}

impl CongestionControl {
    /// The algorithm to set, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::PodDefault => None,
            Self::Named(n) => Some(n),
        }
    }
}

impl std::fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name().unwrap_or("default"))
    }
}

/// The kernel's names are at most 15 bytes (`TCP_CA_NAME_MAX` less the NUL), lowercase
/// letters, digits and `_`.
fn parse_congestion_control(s: &str) -> Result<CongestionControl, String> {
    if s == "default" {
        return Ok(CongestionControl::PodDefault);
    }
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    if s.is_empty() || s.len() > 15 || !s.chars().all(valid) {
        return Err(format!(
            "{s:?} is not a congestion control name (e.g. cubic, reno, bbr; or default)"
        ));
    }
    Ok(CongestionControl::Named(s.to_owned()))
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than one second"));
    }
    Ok(d)
}

fn clap_error(e: clap::Error) -> Error {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Error::Info(e.to_string()),
        _ => Error::Invalid(e.to_string().trim().to_owned()),
    }
}

/// A YAML scalar or list as the string a flag would take.
fn flag_value(key: &str, v: &serde_yaml_ng::Value) -> Result<String, String> {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::String(s) => Ok(s.clone()),
        Y::Number(n) => Ok(n.to_string()),
        Y::Bool(b) => Ok(b.to_string()),
        Y::Sequence(items) => items
            .iter()
            .map(|i| flag_value(key, i))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(",")),
        _ => Err(format!("key {key:?}: {v:?} is not a value")),
    }
}

impl Config {
    /// Parses flags, environment and the `--config` file (flags and environment win), then
    /// checks what the parsers alone cannot.
    pub fn load<I, T>(args: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Config::command();
        let matches = cmd
            .clone()
            .try_get_matches_from(&argv)
            .map_err(clap_error)?;
        if let Some(file) = matches.get_one::<PathBuf>("config") {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::Invalid(format!("config file {}: {e}", file.display())))?;
            let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| {
                Error::Invalid(format!("config file {}: not YAML: {e}", file.display()))
            })?;
            let map = match doc {
                serde_yaml_ng::Value::Mapping(m) => m,
                serde_yaml_ng::Value::Null => Default::default(),
                _ => {
                    return Err(Error::Invalid(format!(
                        "config file {}: must be a mapping of flag names to values",
                        file.display()
                    )));
                }
            };
            for (k, v) in map {
                let key = k
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{k:?}"));
                let arg = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "config file {}: unknown key {key:?}",
                            file.display()
                        ))
                    })?;
                let id = arg.get_id().as_str();
                let value = flag_value(&key, &v)
                    .map_err(|e| Error::Invalid(format!("config file {}: {e}", file.display())))?;
                // Flags and environment win over the file.
                if matches.value_source(id) == Some(ValueSource::DefaultValue)
                    || matches.value_source(id).is_none()
                {
                    argv.push(format!("--{key}={value}").into());
                }
            }
            let matches = cmd.try_get_matches_from(&argv).map_err(|e| {
                Error::Invalid(format!(
                    "{} (config file {})",
                    clap_error(e)
                        .to_string()
                        .trim_start_matches("invalid configuration: "),
                    file.display()
                ))
            })?;
            let c = Config::from_arg_matches(&matches).map_err(clap_error)?;
            return c.validate();
        }
        Config::from_arg_matches(&matches)
            .map_err(clap_error)?
            .validate()
    }

    fn validate(self) -> Result<Self, Error> {
        if !self.admin_address.ip().is_loopback() {
            return Err(Error::Invalid(format!(
                "admin-address {}: the admin endpoint may only listen on a loopback address",
                self.admin_address
            )));
        }
        if self.metrics_address == self.readiness_address {
            return Err(Error::Invalid(format!(
                "metrics-address and readiness-address are both {}",
                self.metrics_address
            )));
        }
        if let Some(dir) = &self.manifests_dir
            && !dir.is_dir()
        {
            return Err(Error::Invalid(format!(
                "manifests-dir {}: not a directory",
                dir.display()
            )));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            return Err(Error::Invalid(format!("log {:?}: {e}", self.log)));
        }
        Ok(self)
    }

    /// The effective configuration as JSON, for the log and the admin view. Nothing in it is
    /// secret today (keys are given by path), but the CA key path is shown only as set/unset so
    /// no future value of that kind can leak.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::json!({
            "config": self.config,
            "socket": self.socket,
            "state-dir": self.state_dir,
            "allow-uid": self.allow_uids,
            "reconcile-seconds": self.reconcile_seconds,
            "verify-seconds": self.verify_seconds,
            "trust-domain": self.trust_domain,
            "cert-lifetime": humantime::format_duration(self.cert_lifetime).to_string(),
            "ca-cert": self.ca_cert,
            "ca-key": self.ca_key.as_ref().map(|_| "<redacted>"),
            "ca-chain": self.ca_chain,
            "manifests-dir": self.manifests_dir,
            "manifests-poll-seconds": self.manifests_poll_seconds,
            "kubernetes": self.kubernetes,
            "root-namespace": self.root_namespace,
            "node-name": self.node_name,
            "node-zone": self.node_zone,
            "cluster-domain": self.cluster_domain,
            "service-cidr": self.service_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "pool-idle-timeout": humantime::format_duration(self.pool_idle_timeout).to_string(),
            "allow-unknown-pods": self.allow_unknown_pods,
            "inbound-idle-timeout": humantime::format_duration(self.inbound_idle_timeout).to_string(),
            "pool-surplus-idle-timeout": humantime::format_duration(self.pool_surplus_idle_timeout).to_string(),
            "app-receive-buffer-kib": self.app_receive_buffer_kib,
            "app-congestion-control": self.app_congestion_control.to_string(),
            "hbone-congestion-control": self.hbone_congestion_control.to_string(),
            "metrics-address": self.metrics_address,
            "readiness-address": self.readiness_address,
            "admin-address": self.admin_address,
            "drain-timeout": humantime::format_duration(self.drain_timeout).to_string(),
            "same-node-shortcut": self.same_node_shortcut,
            "worker-threads": self.worker_threads(),
            "worker-spin-us": self.worker_spin_us,
            "log": self.log,
            "log-format": self.log_format,
        })
    }

    /// What resolving Services needs: this node, its zone, the cluster's domain and ranges.
    pub fn service_settings(&self) -> crate::services::ServiceSettings {
        let set = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        crate::services::ServiceSettings {
            node: set(&self.node_name),
            zone: set(&self.node_zone),
            cluster_domain: self.cluster_domain.clone(),
            service_cidrs: self.service_cidrs.clone(),
        }
    }

    /// Where the CA comes from.
    pub fn ca_source(&self) -> crate::ca::Source {
        match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => crate::ca::Source::Files {
                cert: cert.clone(),
                key: key.clone(),
                chain: self.ca_chain.clone(),
            },
            _ => crate::ca::Source::Embedded {
                dir: self.state_dir.clone(),
            },
        }
    }

    pub fn worker_threads(&self) -> usize {
        self.worker_threads.map(usize::from).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get().min(4))
                .unwrap_or(2)
        })
    }

    pub fn manifests_poll(&self) -> Duration {
        Duration::from_secs_f64(self.manifests_poll_seconds.clamp(0.05, 3600.0))
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs_f64(self.reconcile_seconds.clamp(0.1, 3600.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, Error> {
        let mut v = vec!["ambit-agent"];
        v.extend_from_slice(args);
        Config::load(v)
    }

    #[test]
    fn file_values_apply_below_flags_and_bad_ones_name_key_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.yaml");
        std::fs::write(
            &f,
            "trust-domain: cluster1\ncert-lifetime: 90m\nallow-uid: [0, 1000]\n",
        )
        .unwrap();
        let path = f.to_str().unwrap();
        let c = load(&["--config", path]).unwrap();
        assert_eq!(c.trust_domain, "cluster1");
        assert_eq!(c.cert_lifetime, Duration::from_secs(5400));
        assert_eq!(c.allow_uids, vec![0, 1000]);
        let c = load(&["--config", path, "--trust-domain", "flag.td"]).unwrap();
        assert_eq!(c.trust_domain, "flag.td", "flags win over the file");

        std::fs::write(&f, "cert-lifetime: soon\n").unwrap();
        let e = load(&["--config", path]).unwrap_err().to_string();
        assert!(
            e.contains("cert-lifetime") && e.contains("soon") && e.contains(path),
            "{e}"
        );
        std::fs::write(&f, "trust-domian: x\n").unwrap();
        let e = load(&["--config", path]).unwrap_err().to_string();
        assert!(e.contains("unknown key \"trust-domian\""), "{e}");
        std::fs::write(&f, "- a\n").unwrap();
        assert!(load(&["--config", path]).is_err());
        let e = load(&["--config", "/nonexistent/ambit.yaml"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ambit.yaml"), "{e}");
    }

    #[test]
    fn semantic_checks() {
        let e = load(&["--admin-address", "0.0.0.0:15000"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(load(&["--admin-address", "[::1]:15000"]).is_ok());
        let e = load(&[
            "--metrics-address",
            "0.0.0.0:1",
            "--readiness-address",
            "0.0.0.0:1",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("both"), "{e}");
        let c = load(&[
            "--log",
            "debug",
            "--reconcile-seconds",
            "0.5",
            "--log",
            "info",
        ])
        .unwrap();
        assert_eq!(
            (c.log.as_str(), c.reconcile_seconds),
            ("info", 0.5),
            "a repeated flag takes its last value"
        );
        let e = load(&["--log", "info,[["]).unwrap_err().to_string();
        assert!(e.contains("log"), "{e}");
        assert!(matches!(load(&["--help"]), Err(Error::Info(_))));
        let r = load(&["--admin-address", "0.0.0.0:15000"]).unwrap_err();
        assert!(matches!(r, Error::Invalid(_)));
        let c = load(&[]).unwrap();
        assert!(!c.redacted().to_string().contains("PRIVATE"));
        let c = load(&["--ca-cert", "/c", "--ca-key", "/secret/key.pem"]).unwrap();
        assert!(!c.redacted().to_string().contains("/secret/key.pem"));
    }

    /// README's flag table is the reference operators read: every flag it lists exists with
    /// that environment variable and that default, and every flag of the agent is in it.
    #[test]
    fn readme_flag_table_matches_the_agent_s_flags_environment_and_defaults() {
        use clap::CommandFactory;
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let cmd = Config::command();
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        };
        let mut documented = Vec::new();
        for row in readme.lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let (flags, envs, defaults) = (ticked(cells[0]), ticked(cells[1]), ticked(cells[2]));
            assert_eq!(flags.len(), envs.len(), "{row}");
            for (i, flag) in flags.iter().enumerate() {
                let long = flag.trim_start_matches("--");
                let arg = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .unwrap_or_else(|| {
                        panic!("README documents {flag}, the agent has no such flag")
                    });
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert_eq!(env.as_deref(), Some(envs[i].as_str()), "{flag}");
                let default: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                match defaults.get(i) {
                    Some(d) => assert_eq!(default, vec![d.clone()], "{flag}: README says {d}"),
                    // Described in words: a switch that is off, or a default computed at start.
                    None if cells[2].trim() == "off" => assert!(
                        matches!(arg.get_action(), clap::ArgAction::SetTrue),
                        "{flag}: README says off, the agent's flag is not a switch"
                    ),
                    None => assert!(
                        default.is_empty(),
                        "{flag}: README gives no default, the agent has {default:?}"
                    ),
                }
                documented.push(long.to_owned());
            }
        }
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            assert!(
                documented.iter().any(|d| d == long),
                "--{long} is missing from README's flag table"
            );
        }
        // Nothing given: the agent makes its own CA rather than failing to start.
        let c = Config::try_parse_from(["ambit-agent"]).unwrap();
        assert!(matches!(c.ca_source(), crate::ca::Source::Embedded { .. }));
    }

    #[test]
    fn app_congestion_control_is_a_kernel_name_or_the_pods_default() {
        let cc = |args: &[&str]| load(args).map(|c| c.app_congestion_control);
        assert_eq!(cc(&[]).unwrap().name(), Some("cubic"));
        let c = cc(&["--app-congestion-control", "default"]).unwrap();
        assert_eq!((c.name(), c.to_string().as_str()), (None, "default"));
        let c = cc(&["--app-congestion-control", "bbr"]).unwrap();
        assert_eq!(c.name(), Some("bbr"));
        let hbone = |args: &[&str]| load(args).unwrap().hbone_congestion_control;
        assert_eq!(hbone(&[]).name(), None, "HBONE keeps the pod's by default");
        let c = hbone(&["--hbone-congestion-control", "cubic"]);
        assert_eq!(c.name(), Some("cubic"));
        for bad in ["", "BBR", "cubic reno", "../cubic", "sixteen_letters_"] {
            let e = cc(&["--app-congestion-control", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("congestion control name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn service_settings_come_from_node_zone_domain_and_ranges() {
        let c = load(&[
            "--node-name",
            "n1",
            "--service-cidr",
            "10.96.0.0/12,fd00:10:96::/112",
        ])
        .unwrap();
        let s = c.service_settings();
        assert_eq!(s.node.as_deref(), Some("n1"));
        assert_eq!(s.zone, None);
        assert_eq!(s.cluster_domain, "cluster.local");
        assert_eq!(s.service_cidrs.len(), 2);
        let e = load(&["--service-cidr", "10.96.0.0/40"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--service-cidr") && e.contains("10.96.0.0/40"),
            "{e}"
        );
    }

    #[test]
    fn identity_settings_are_validated() {
        let parse = |args: &[&str]| {
            let mut v = vec!["ambit-agent"];
            v.extend_from_slice(args);
            Config::try_parse_from(v)
        };
        assert!(parse(&["--trust-domain", "bad/td"]).is_err());
        assert!(parse(&["--cert-lifetime", "10ms"]).is_err());
        assert!(parse(&["--cert-lifetime", "soon"]).is_err());
        assert_eq!(
            parse(&["--cert-lifetime", "90m"]).unwrap().cert_lifetime,
            Duration::from_secs(5400)
        );
        assert!(
            parse(&["--ca-cert", "/x.pem"]).is_err(),
            "a CA certificate needs its key"
        );
        let c = parse(&["--ca-cert", "/c.pem", "--ca-key", "/k.pem"]).unwrap();
        assert!(matches!(c.ca_source(), crate::ca::Source::Files { .. }));
    }
}
