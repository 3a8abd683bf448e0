//! ambit-agent: wiring only (configuration, logging, runtime, signals).

use std::sync::Arc;

use ambit_agent::{cni_server, config::Config, state::StateDir, workloads::Manager};
use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid --log filter {:?}", config.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    info!(?config, "starting ambit-agent");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let state = StateDir::open(&config.state_dir)?;
    let mgr = Manager::new(state, config.mark);
    let started = std::time::Instant::now();
    let summary = mgr.adopt()?;
    info!(
        ?summary,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "re-adopted pods from the state directory"
    );
    let listener = cni_server::bind(&config.socket)?;
    info!(socket = %config.socket.display(), "listening for the CNI plugin");
    let stop = CancellationToken::new();
    let server = tokio::spawn(cni_server::serve(
        listener,
        mgr.clone(),
        Arc::new(config.allow_uids.clone()),
        stop.clone(),
    ));
    let reconciler = {
        let (mgr, stop, every) = (mgr.clone(), stop.clone(), config.reconcile_interval());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => { mgr.reconcile(); }
                }
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
    }
    stop.cancel();
    let _ = server.await;
    let _ = reconciler.await;
    // Pod records stay in the state directory: the next agent re-adopts the pods.
    let _ = std::fs::remove_file(&config.socket);
    info!(pods = mgr.len(), "stopped");
    Ok(())
}
