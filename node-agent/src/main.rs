//! ambit-agent: wiring only (configuration, logging, runtime, endpoints, signals).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use ambit_agent::admin::{self, Admin, Endpoint, LogControl};
use ambit_agent::config::{self, Config};
use ambit_agent::metrics::AgentMetrics;
use ambit_agent::{
    ca::Ca, certs::CertManager, cni_server, manifests, state::StateDir, store::Store,
    workloads::Manager,
};
use ambit_proxy::mesh::{Mesh, Settings};
use ambit_proxy::metrics::ProxyMetrics;
use ambit_proxy::workers::Workers;
use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};

fn main() -> std::process::ExitCode {
    let config = match Config::load(std::env::args_os()) {
        Ok(c) => c,
        Err(config::Error::Info(text)) => {
            println!("{text}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ambit-agent: {e}");
            return std::process::ExitCode::from(config::EXIT_CONFIG as u8);
        }
    };
    let log = init_logging(&config);
    info!(config = %config.redacted(), "starting ambit-agent (effective configuration)");
    // Before the first pod socket exists: sockets belong to the cgroup they were created in.
    let cgroup = match ambit_agent::cgroup::settle() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("ambit-agent cannot start: {e}");
            // Not `eprintln!`: stderr may be a full non-blocking pipe by now (`log`).
            let _ = writeln!(std::io::stderr(), "ambit-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    info!(cgroup = %cgroup.path, dir = %cgroup.dir.display(), id = cgroup.matcher.id,
        level = cgroup.matcher.level, created = cgroup.created,
        "the pods' rules recognise the agent's sockets by this cgroup");
    // Before any thread allocates. Freed memory goes back on each reconcile pass instead.
    ambit_common::sys::tune_heap(HEAP_TRIM_THRESHOLD, HEAP_MMAP_THRESHOLD);
    // The control plane (sources, CNI server, endpoints, reconcile and certificate loops) needs
    // little: the pods' listeners and proxied connections run on the data-path threads
    // (`--worker-threads`, see ambit_proxy::workers).
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("building the runtime")
        .and_then(|rt| rt.block_on(run(config, log, cgroup.matcher)));
    cgroup.release();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let e = ambit_common::report::one_line(e.as_ref());
            tracing::error!("ambit-agent failed: {e}");
            let _ = writeln!(std::io::stderr(), "ambit-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Free memory glibc may keep at the top of a heap before `free` returns it (2 MiB).
const HEAP_TRIM_THRESHOLD: usize = 2 << 20;
/// Allocations at least this large get their own mapping (1 MiB: above every buffer the data
/// path uses, so relay and frame buffers are reused, not mapped and faulted in again).
const HEAP_MMAP_THRESHOLD: usize = 1 << 20;

/// Logging to stderr, plain or JSON, with a filter the admin endpoint can change.
fn init_logging(config: &Config) -> LogControl {
    // Validated by Config::load.
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Before the first line: a stalled log reader must not block the data path (`log`).
    let pipe = ambit_common::sys::nonblocking_if_pipe(std::os::fd::AsFd::as_fd(&std::io::stderr()));
    let (plain, json) = if config.log_format == "json" {
        (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(ambit_agent::log::Stderr),
            ),
        )
    } else {
        (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .fmt_fields(ambit_agent::log::PlainFields)
                    .with_timer(ambit_agent::log::Clock)
                    .with_writer(ambit_agent::log::Stderr),
            ),
            None,
        )
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(json)
        .init();
    match pipe {
        Ok(true) => tracing::info!(
            "stderr is a pipe: lines its reader does not take are dropped, never waited for \
             (ambit_log_lines_dropped_total)"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!("stderr could not be made non-blocking: {e}"),
    }
    Arc::new(move |level: Option<&str>| {
        if let Some(l) = level {
            let f = EnvFilter::try_new(l).map_err(|e| format!("invalid filter {l:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())?;
        }
        handle
            .with_current(|f| f.to_string())
            .map_err(|e| e.to_string())
    })
}

/// The agent from start to stop: certificates and workload sources first, then the
/// endpoints (so readiness can say "not ready" while pods are re-adopted), the pods, the
/// plugin's socket and the upkeep; on SIGTERM/SIGINT, the drain.
async fn run(
    config: Config,
    log: LogControl,
    exemption: ambit_common::redirect::AgentCgroup,
) -> anyhow::Result<()> {
    let state = StateDir::open(&config.state_dir)?;
    let ca = Ca::load(&config.ca_source(), &config.trust_domain).context("loading the CA")?;
    info!(ca = %ca.description, trust_domain = %config.trust_domain, "certificate authority ready");
    let agent_metrics = Arc::new(AgentMetrics::default());
    let certs =
        Arc::new(CertManager::new(ca, config.cert_lifetime).with_metrics(agent_metrics.clone()));
    let store = Store::with_services(&config.trust_domain, config.service_settings());
    store.allow_unknown_pods(config.allow_unknown_pods);
    let stop = CancellationToken::new();
    let mut tasks = start_sources(&config, &store, &stop).await?;
    let proxy_metrics = Arc::new(ProxyMetrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    proxy_metrics.register(&mut registry);
    agent_metrics.register(&mut registry);
    store.register_metrics(&mut registry);
    // The workers keep their access and log lines and write them when they run out of work.
    let workers = Workers::start_with(
        config.worker_threads(),
        Duration::from_micros(config.worker_spin_us.into()),
        ambit_agent::log::WORKER_HOOKS,
    )
    .context("starting the data-path threads")?;
    workers.register_metrics(&mut registry);
    let mesh = mesh(&config, &store, &certs, proxy_metrics, workers);
    let mgr = Manager::new(
        state,
        exemption,
        mesh.clone(),
        store.clone(),
        agent_metrics.clone(),
    );

    // Endpoints first: readiness answers "not ready" while pods are re-adopted.
    let admin = Arc::new(Admin {
        mgr: mgr.clone(),
        store: store.clone(),
        certs: certs.clone(),
        registry,
        config: config.redacted(),
        log,
    });
    let http_stop = CancellationToken::new();
    tasks.extend(serve_endpoints(&config, admin, &http_stop).await?);

    let started = std::time::Instant::now();
    let summary = mgr.adopt()?;
    info!(
        ?summary,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "re-adopted pods from the state directory"
    );
    let listener = cni_server::bind(&config.socket)?;
    let socket_identity = cni_server::identity(&config.socket);
    info!(socket = %config.socket.display(), "listening for the CNI plugin");
    let server = tokio::spawn(cni_server::serve(
        listener,
        mgr.clone(),
        Arc::new(config.allow_uids.clone()),
        stop.clone(),
    ));
    tasks.extend(start_upkeep(&config, &mgr, &store, &certs, &stop));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
    }
    // New pods wait for the next agent (their ADD fails closed); captured pods stop accepting,
    // open connections get `drain-timeout` to finish.
    stop.cancel();
    let _ = server.await;
    // During a surge upgrade the next agent has bound the path already: only our own socket
    // file is removed, never the successor's.
    if cni_server::identity(&config.socket) == socket_identity {
        let _ = std::fs::remove_file(&config.socket);
    } else {
        info!("the plugin socket now belongs to another agent: left in place");
    }
    drain(&config, &mgr).await;
    http_stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    // The access lines of the last connections before the agent's last line.
    mesh.workers.flush().await;
    // Pod records stay in the state directory: the next agent re-adopts the pods.
    info!(pods = mgr.len(), "stopped");
    Ok(())
}

/// Starts the workload sources the configuration names (manifests directory, Kubernetes).
/// The manifests are loaded once before this returns, so re-adopted pods have their
/// identities and policies from their first connection.
async fn start_sources(
    config: &Config,
    store: &Arc<Store>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let cx = ambit_agent::records::Context {
        root_namespace: config.root_namespace.clone(),
        node: config.node_name.clone(),
    };
    if let Some(dir) = &config.manifests_dir {
        let loaded = manifests::Directory::read(dir, cx.clone());
        let (objects, problems) = loaded.objects();
        manifests::report_statuses(&objects.statuses, &Default::default());
        manifests::apply_loaded(store, dir, objects, &problems, loaded.len());
        tasks.push(tokio::spawn(manifests::watch(
            loaded,
            store.clone(),
            config.manifests_poll(),
            stop.clone(),
        )));
    }
    if config.kubernetes {
        // Declared before pods are re-adopted: until the first snapshot the agent is not
        // ready and inbound connections are refused (policy unknown).
        store.expect(ambit_agent::store::Source::Kubernetes);
        let client = kube::Client::try_default()
            .await
            .context("--kubernetes: no usable in-cluster or $KUBECONFIG configuration")?;
        tasks.push(tokio::spawn(ambit_agent::k8s::run(
            client,
            store.clone(),
            cx,
            stop.clone(),
        )));
    }
    Ok(tasks)
}

/// What every pod's data path shares: the workload store, certificates, tuning, metrics.
fn mesh(
    config: &Config,
    store: &Arc<Store>,
    certs: &Arc<CertManager>,
    metrics: Arc<ProxyMetrics>,
    workers: Workers,
) -> Arc<Mesh> {
    let shortcut = config
        .same_node_shortcut
        .then(|| {
            ambit_common::sockmap::Redirect::new()
                .inspect_err(|e| {
                    warn!("same-node shortcut unavailable, same-node HBONE uses TCP: {e}")
                })
                .ok()
        })
        .flatten();
    metrics.shortcut_enabled.set(shortcut.is_some().into());
    let app_congestion_control = congestion_control(
        "--app-congestion-control",
        &config.app_congestion_control,
        "sockets facing apps",
    );
    let hbone_congestion_control = congestion_control(
        "--hbone-congestion-control",
        &config.hbone_congestion_control,
        "HBONE sockets",
    );
    Arc::new(Mesh {
        directory: store.clone(),
        certs: certs.clone(),
        trust_domain: config.trust_domain.clone(),
        settings: Settings {
            pool_idle_timeout: config.pool_idle_timeout,
            inbound_idle_timeout: config.inbound_idle_timeout,
            pool_surplus_idle_timeout: config.pool_surplus_idle_timeout,
            app_receive_buffer: config.app_receive_buffer_kib as usize * 1024,
            app_congestion_control,
            hbone_congestion_control,
            ..Settings::default()
        },
        metrics,
        workers,
        shortcut,
    })
}

/// The congestion control `flag` names, if the kernel has it; if not, a warning that `sockets`
/// keep their pod's default.
fn congestion_control(flag: &str, cc: &config::CongestionControl, sockets: &str) -> Option<String> {
    let name = cc.name()?;
    match ambit_proxy::socket::congestion_control_available(name) {
        Ok(()) => Some(name.to_owned()),
        Err(e) => {
            warn!("{flag} {name}: not available ({e}); {sockets} keep their pod's default");
            None
        }
    }
}

/// Binds and serves the metrics, readiness and admin endpoints until `stop`.
async fn serve_endpoints(
    config: &Config,
    admin: Arc<Admin>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for (addr, which) in [
        (config.metrics_address, Endpoint::Metrics),
        (config.readiness_address, Endpoint::Readiness),
        (config.admin_address, Endpoint::Admin),
    ] {
        let l = admin::bind(addr, which).await?;
        tasks.push(tokio::spawn(admin::serve(
            l,
            which,
            admin.clone(),
            stop.clone(),
        )));
    }
    Ok(tasks)
}

/// Periodic upkeep until `stop`: pods still exist, rules intact, certificates issued and
/// renewed. Each pass does netns switches, netlink and key generation: it runs on the
/// blocking pool, never on the threads that carry the pods' traffic.
fn start_upkeep(
    config: &Config,
    mgr: &Arc<Manager>,
    store: &Arc<Store>,
    certs: &Arc<CertManager>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let m = mgr.clone();
    let reconcile = every(config.reconcile_interval(), stop.clone(), move || {
        m.reconcile();
        // Memory freed since the last pass goes back to the system (RSS follows load).
        ambit_common::sys::trim_heap();
    });
    let m = mgr.clone();
    let verify = Duration::from_secs_f64(config.verify_seconds.clamp(0.1, 3600.0));
    let verify = every(verify, stop.clone(), move || {
        m.verify_rules();
    });
    // Every second (more often for very short lifetimes): certificates of identities that
    // appeared (a Pod object changed a service account) are issued, due ones renewed.
    let renew =
        (config.cert_lifetime / 20).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let (s, c) = (store.clone(), certs.clone());
    let renew = every(renew, stop.clone(), move || {
        let present = s.local_identities();
        // Issue (or renew) the certificate of every local identity ahead of use.
        for id in &present {
            if let Err(e) = c.get(id) {
                tracing::warn!(identity = %id, "cannot issue a certificate: {e}");
            }
        }
        c.maintain(&present);
    });
    vec![reconcile, verify, renew]
}

/// Gives open connections `drain_timeout`, cuts the rest, and removes this agent's exemption
/// tables (its sockets are gone with it; a successor has its own).
async fn drain(config: &Config, mgr: &Arc<Manager>) {
    let started = std::time::Instant::now();
    let drained = mgr.drain(config.drain_timeout).await;
    info!(
        cut = drained.cut,
        hbone_cut = drained.hbone_cut,
        waited_ms = started.elapsed().as_millis() as u64,
        "drained: {} proxied connections and {} inbound HBONE connections still open at the deadline are cut",
        drained.cut,
        drained.hbone_cut
    );
    let m = mgr.clone();
    let removed = tokio::task::spawn_blocking(move || m.remove_exemptions())
        .await
        .unwrap_or(0);
    info!(pods = removed, "exemption tables removed");
}

/// Runs `work` on the blocking pool every `period` (one pass at a time) until `stop`.
fn every(
    period: Duration,
    stop: CancellationToken,
    work: impl Fn() + Send + Sync + 'static,
) -> JoinHandle<()> {
    let work = Arc::new(work);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let w = work.clone();
                    let _ = tokio::task::spawn_blocking(move || w()).await;
                }
            }
        }
    })
}
