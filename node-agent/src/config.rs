//! The agent's configuration: flags, each with an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Clone, Debug, Parser)]
#[command(name = "ambit-agent", version, about = "Ambit node agent")]
pub struct Config {
    /// Unix socket the CNI plugin connects to (created mode 0600).
    #[arg(long, env = "AMBIT_SOCKET", default_value = ambit_common::DEFAULT_AGENT_SOCKET)]
    pub socket: PathBuf,
    /// Directory holding the record of captured pods.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/run/ambit/state")]
    pub state_dir: PathBuf,
    /// SO_MARK on every socket the agent opens inside a pod (must match the plugin's agentMark).
    #[arg(long, env = "AMBIT_MARK", default_value_t = ambit_common::DEFAULT_AGENT_MARK, value_parser = parse_mark)]
    pub mark: u32,
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
    /// Namespace whose policies without selector apply to the whole mesh.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// Seconds between checks of --manifests-dir for changes.
    #[arg(long, env = "AMBIT_MANIFESTS_POLL_SECONDS", default_value_t = 1.0)]
    pub manifests_poll_seconds: f64,
    /// A pooled HBONE connection without streams for this long is closed, e.g. 5m.
    #[arg(long, env = "AMBIT_POOL_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_lifetime)]
    pub pool_idle_timeout: Duration,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log: String,
    /// Log format: plain or json.
    #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let v = if let Some(hex) = s.strip_prefix("0x") {
        u32::from_str_radix(hex, 16)
    } else {
        s.parse()
    }
    .map_err(|e| format!("{s:?} is not a mark: {e}"))?;
    if v == 0 {
        return Err("mark 0 cannot tag the agent's sockets".into());
    }
    Ok(v)
}

fn parse_trust_domain(s: &str) -> Result<String, String> {
    ambit_proxy::identity::Identity::parse(&format!("spiffe://{s}/ns/n/sa/s"))
        .map(|id| id.trust_domain)
        .map_err(|_| format!("{s:?} is not a trust domain (letters, digits, '-', '.', '_')"))
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than one second"));
    }
    Ok(d)
}

impl Config {
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

    #[test]
    fn marks_parse_in_hex_and_decimal() {
        assert_eq!(parse_mark("0x539"), Ok(0x539));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("zz").is_err());
    }

    #[test]
    fn defaults() {
        let c = Config::try_parse_from(["ambit-agent"]).unwrap();
        assert_eq!(c.socket, PathBuf::from("/var/run/ambit/cni.sock"));
        assert_eq!(c.allow_uids, vec![0]);
        assert_eq!(c.mark, 0x539);
        assert!(Config::try_parse_from(["ambit-agent", "--log-format", "xml"]).is_err());
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.cert_lifetime, Duration::from_secs(86_400));
        assert!(matches!(c.ca_source(), crate::ca::Source::Embedded { .. }));
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
