//! ambit-agent: wiring only (configuration, logging, runtime, signals).

use std::sync::Arc;

use ambit_agent::{
    ca::Ca, certs::CertManager, cni_server, config::Config, manifests, state::StateDir,
    store::Store, workloads::Manager,
};
use ambit_proxy::mesh::{Mesh, Settings};
use anyhow::Context;
use clap::Parser;
use std::time::Duration;
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
    let ca = Ca::load(&config.ca_source(), &config.trust_domain).context("loading the CA")?;
    info!(ca = %ca.description, trust_domain = %config.trust_domain, "certificate authority ready");
    let certs = Arc::new(CertManager::new(ca, config.cert_lifetime));
    let store = Store::new(&config.trust_domain);
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(dir) = &config.manifests_dir {
        // The first load happens before pods are re-adopted, so their identities are right
        // from the first connection.
        let (objects, problems) = manifests::load(dir, &config.root_namespace);
        for p in &problems {
            tracing::warn!(file = %p.file.display(), "invalid manifest skipped: {}", p.message);
        }
        store.set_manifests(objects);
        tasks.push(tokio::spawn(manifests::watch(
            dir.clone(),
            config.root_namespace.clone(),
            store.clone(),
            config.manifests_poll(),
            stop.clone(),
        )));
    }
    let mesh = Arc::new(Mesh {
        directory: store.clone(),
        certs: certs.clone(),
        trust_domain: config.trust_domain.clone(),
        settings: Settings {
            pool_idle_timeout: config.pool_idle_timeout,
            ..Settings::default()
        },
        stats: Default::default(),
    });
    let mgr = Manager::new(state, config.mark, mesh, store.clone());
    let started = std::time::Instant::now();
    let summary = mgr.adopt()?;
    info!(
        ?summary,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "re-adopted pods from the state directory"
    );
    let listener = cni_server::bind(&config.socket)?;
    info!(socket = %config.socket.display(), "listening for the CNI plugin");
    let server = tokio::spawn(cni_server::serve(
        listener,
        mgr.clone(),
        Arc::new(config.allow_uids.clone()),
        stop.clone(),
    ));
    tasks.push({
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
    });
    tasks.push({
        // Renewal at half-life is checked often enough for short test lifetimes too.
        let every =
            (config.cert_lifetime / 20).clamp(Duration::from_millis(100), Duration::from_secs(30));
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let present = store.local_identities();
                        // Issue (or renew) the certificate of every local identity ahead of use.
                        for id in &present {
                            if let Err(e) = certs.get(id) {
                                tracing::warn!(identity = %id, "cannot issue a certificate: {e}");
                            }
                        }
                        certs.maintain(&present);
                    }
                }
            }
        })
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
    }
    stop.cancel();
    let _ = server.await;
    for t in tasks {
        let _ = t.await;
    }
    // Pod records stay in the state directory: the next agent re-adopts the pods.
    let _ = std::fs::remove_file(&config.socket);
    info!(pods = mgr.len(), "stopped");
    Ok(())
}
