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

impl Config {
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
    }
}
