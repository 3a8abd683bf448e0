//! `ambit-install`: the DaemonSet's installer container (`run`), plus one-shot commands for
//! operators and probes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ambit_install::cluster::{self, OnExit};
use ambit_install::cniconf::PLUGIN_TYPE;
use ambit_install::install::{self, Mode, Outcome, Settings};
use ambit_install::watch;
use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "ambit-install", version, about)]
struct Cli {
    /// The host's CNI configuration directory (as mounted in the container).
    #[arg(
        long,
        env = "AMBIT_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    cni_conf_dir: PathBuf,
    /// The host's CNI binary directory (as mounted in the container).
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The ambit-cni binary to copy onto the host.
    #[arg(
        long,
        env = "AMBIT_PLUGIN_BINARY",
        default_value = "/usr/local/bin/ambit-cni"
    )]
    plugin_binary: PathBuf,
    /// chained: append ambit-cni to the primary network's file. own-file: write --own-file
    /// (the primary's plugins plus ambit-cni) and leave the primary's file alone.
    #[arg(long, env = "AMBIT_CNI_MODE", value_enum, default_value_t = ModeArg::Chained)]
    mode: ModeArg,
    /// The file written in own-file mode; it must sort before the primary's file.
    #[arg(long, env = "AMBIT_OWN_FILE", default_value = "00-ambit.conflist")]
    own_file: String,
    /// ambit-cni's settings (a JSON object, or @path to a file holding one), e.g.
    /// {"agentSocket": "/var/run/ambit/cni.sock", "enrollment": "labels"}.
    #[arg(long, env = "AMBIT_PLUGIN_CONFIG", default_value = "{}")]
    plugin_config: String,
    /// Log filter (tracing-subscriber syntax).
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Chained,
    OwnFile,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnExitArg {
    /// Leave the plugin installed (upgrade-safe).
    Keep,
    /// Remove it.
    Uninstall,
    /// Remove it only if --daemonset no longer exists or is being deleted.
    Auto,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install, keep installed until SIGTERM, then keep or uninstall (--on-exit).
    Run {
        /// Re-check at least this often even without a file event.
        #[arg(long, env = "AMBIT_RESYNC_SECONDS", default_value_t = 30)]
        resync_seconds: u64,
        #[arg(long, env = "AMBIT_ON_EXIT", value_enum, default_value_t = OnExitArg::Auto)]
        on_exit: OnExitArg,
        /// namespace/name of the DaemonSet this installer belongs to (for --on-exit auto).
        #[arg(long, env = "AMBIT_DAEMONSET")]
        daemonset: Option<String>,
        /// This node's name: once the plugin is chained and the agent answers STATUS, remove
        /// the taint ambit.dev/agent-not-ready from it (if the node was registered with it).
        #[arg(long, env = "AMBIT_UNTAINT_NODE")]
        untaint_node: Option<String>,
    },
    /// Install once and exit (exit 3 if there is no pod network configuration yet).
    Install,
    /// Exit 0 if the binary and the configuration are in place (readiness probe).
    Check,
    /// Remove ambit-cni from every configuration file, our own file and the binary.
    Uninstall,
}

fn plugin_entry(raw: &str) -> anyhow::Result<serde_json::Value> {
    let text = match raw.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => raw.to_string(),
    };
    let serde_json::Value::Object(settings) =
        serde_json::from_str(&text).context("--plugin-config is not JSON")?
    else {
        bail!("--plugin-config must be a JSON object");
    };
    if settings
        .get("type")
        .is_some_and(|t| t.as_str() != Some(PLUGIN_TYPE))
    {
        bail!("--plugin-config sets \"type\" to something other than {PLUGIN_TYPE:?}");
    }
    let mut entry = serde_json::Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    entry.insert("name".into(), PLUGIN_TYPE.into());
    entry.extend(settings);
    Ok(serde_json::Value::Object(entry))
}

async fn exit_decision(on_exit: OnExitArg, daemonset: Option<&str>) -> OnExit {
    match on_exit {
        OnExitArg::Keep => OnExit::Keep,
        OnExitArg::Uninstall => OnExit::Uninstall,
        OnExitArg::Auto => {
            let Some((ns, name)) = daemonset.and_then(|d| d.split_once('/')) else {
                warn!("--on-exit auto without --daemonset namespace/name: keeping the plugin");
                return OnExit::Keep;
            };
            let client = match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("no Kubernetes client ({e}): keeping the plugin installed");
                    return OnExit::Keep;
                }
            };
            match tokio::time::timeout(Duration::from_secs(5), cluster::lookup(client, ns, name))
                .await
            {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    warn!("cannot read DaemonSet {ns}/{name} ({e}): keeping the plugin installed");
                    OnExit::Keep
                }
                Err(_) => {
                    warn!("the API server did not answer within 5 s: keeping the plugin installed");
                    OnExit::Keep
                }
            }
        }
    }
}

fn agent_socket(entry: &serde_json::Value) -> PathBuf {
    entry
        .get("agentSocket")
        .and_then(serde_json::Value::as_str)
        .unwrap_or(ambit_common::DEFAULT_AGENT_SOCKET)
        .into()
}

/// Removes the node's not-ready taint once pods scheduled here would be captured: the plugin
/// is chained and the agent answers STATUS (re-adopted its pods, synced with the API server).
/// Polls every 2 s; runs on its own thread until done.
fn untaint_when_ready(s: &Settings, socket: &std::path::Path, node: &str) {
    use ambit_common::protocol::{self, Request};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return error!("cannot start the untaint task: {e}"),
    };
    let mut last = String::new();
    loop {
        let ready = install::check(s).and_then(|_| {
            match protocol::call(socket, &Request::Status, None, Duration::from_secs(5)) {
                Ok(r) if r.ok => Ok(()),
                Ok(r) => Err(format!("agent not ready: {}", r.error.unwrap_or_default())),
                Err(e) => Err(format!("agent not reachable: {e}")),
            }
        });
        match ready {
            Err(why) => {
                if why != last {
                    info!(
                        "node {node} keeps taint {}: {why}",
                        cluster::NOT_READY_TAINT
                    );
                    last = why;
                }
            }
            Ok(()) => {
                let r = rt.block_on(async {
                    let client = kube::Client::try_default().await?;
                    cluster::untaint(client, node, cluster::NOT_READY_TAINT).await
                });
                match r {
                    Ok(true) => {
                        return info!(
                            "removed taint {} from node {node}",
                            cluster::NOT_READY_TAINT
                        );
                    }
                    Ok(false) => {
                        return info!(
                            "node {node} has no taint {}: nothing to remove",
                            cluster::NOT_READY_TAINT
                        );
                    }
                    Err(e) => warn!(
                        "cannot remove taint {} from node {node} (retrying): {e}",
                        cluster::NOT_READY_TAINT
                    ),
                }
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            error!("{}", ambit_common::report::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings {
        conf_dir: cli.cni_conf_dir,
        bin_dir: cli.cni_bin_dir,
        plugin_binary: cli.plugin_binary,
        entry: plugin_entry(&cli.plugin_config)?,
        mode: match cli.mode {
            ModeArg::Chained => Mode::Chained,
            ModeArg::OwnFile => Mode::OwnFile(cli.own_file),
        },
    };
    match cli.command {
        Cmd::Install => {
            install::install_binary(&settings)?;
            match install::install_config(&settings)? {
                Outcome::NoPrimary => {
                    error!(
                        "no pod network configuration in {}",
                        settings.conf_dir.display()
                    );
                    Ok(ExitCode::from(3))
                }
                Outcome::Unchanged(p) | Outcome::Wrote(p) => {
                    println!("{}", p.display());
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Cmd::Check => match install::check(&settings) {
            Ok(p) => {
                println!("installed: {}", p.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(why) => {
                println!("not installed: {why}");
                Ok(ExitCode::FAILURE)
            }
        },
        Cmd::Uninstall => {
            for line in install::uninstall(&settings)? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            resync_seconds,
            on_exit,
            daemonset,
            untaint_node,
        } => {
            if let Some(node) = untaint_node {
                let (s, socket) = (settings.clone(), agent_socket(&settings.entry));
                std::thread::spawn(move || untaint_when_ready(&s, &socket, &node));
            }
            info!(
                conf_dir = %settings.conf_dir.display(),
                bin_dir = %settings.bin_dir.display(),
                mode = ?settings.mode,
                "ambit-install starting"
            );
            watch::run(&settings, Duration::from_secs(resync_seconds.max(1)))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match rt.block_on(exit_decision(on_exit, daemonset.as_deref())) {
                OnExit::Keep => info!(
                    "leaving ambit-cni installed: new pods wait for the next agent instead of starting uncaptured"
                ),
                OnExit::Uninstall => {
                    install::uninstall(&settings)?;
                    info!("ambit-cni uninstalled from this node");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
