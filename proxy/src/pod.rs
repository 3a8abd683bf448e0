//! Starts and stops the listeners of one captured pod.

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::context::{PodContext, PodShared};
use crate::hbone;
use crate::mesh::Mesh;
use crate::passthrough::{self, Direction};
use crate::socket::SocketFactory;

pub use ambit_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// A running pod proxy; dropping it (or [`PodProxy::stop`]) closes its listeners and cuts its
/// connections.
pub struct PodProxy {
    stop: CancellationToken,
    shared: Arc<PodShared>,
}

impl PodProxy {
    /// Binds all three listeners (synchronously, so the caller can ack the plugin only once
    /// they exist: connections arriving before their accept loop runs wait in the backlog)
    /// and starts serving them, each on a data-path worker ([`crate::workers`]). Must be
    /// called inside a tokio runtime (the pod's upkeep tasks run on it).
    pub fn start(
        factory: Arc<dyn SocketFactory>,
        ctx: PodContext,
        mesh: Arc<Mesh>,
    ) -> io::Result<Self> {
        let out = factory.listener(OUTBOUND_PORT)?;
        // Every connection to 15001 comes from the pod's own apps.
        crate::socket::limit_receive_buffer((&out).into(), mesh.settings.app_receive_buffer)?;
        let cc = mesh.settings.app_congestion_control.as_deref();
        crate::socket::set_congestion_control((&out).into(), cc);
        let inb = factory.listener(INBOUND_PLAINTEXT_PORT)?;
        let hbone = factory.listener(INBOUND_HBONE_PORT)?;
        let cc = mesh.settings.hbone_congestion_control.as_deref();
        crate::socket::set_congestion_control((&hbone).into(), cc);
        let stop = CancellationToken::new();
        let shared = Arc::new(PodShared::new(ctx, factory, mesh, &stop));
        let workers = &shared.mesh.workers;
        for (dir, listener) in [(Direction::Outbound, out), (Direction::Inbound, inb)] {
            let (shared, stop) = (shared.clone(), stop.clone());
            workers.spawn(move || async move {
                if let Some(l) = register(listener, &shared) {
                    passthrough::serve(dir, l, shared, stop).await;
                }
            });
        }
        {
            let (shared, stop) = (shared.clone(), stop.clone());
            workers.spawn(move || async move {
                if let Some(l) = register(hbone, &shared) {
                    hbone::server::serve(l, shared, stop).await;
                }
            });
        }
        tokio::spawn(reap_idle(shared.clone(), stop.clone()));
        tokio::spawn(watch_policies(shared.clone(), stop.clone()));
        Ok(Self { stop, shared })
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn shared(&self) -> Arc<PodShared> {
        self.shared.clone()
    }

    /// Open pooled HBONE connections of this pod.
    pub fn pooled_connections(&self) -> usize {
        self.shared.pool.connections()
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        let series =
            std::mem::take(&mut *self.shared.series.lock().unwrap_or_else(|p| p.into_inner()));
        self.shared.mesh.metrics.forget(&series);
    }
}

/// The listener registered with the running worker's runtime. Cannot fail for a listening
/// socket the factory made (non-blocking); logged and closed if it does.
fn register(l: std::net::TcpListener, pod: &PodShared) -> Option<TcpListener> {
    match TcpListener::from_std(l) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(pod = %pod.ctx.name, "registering a listener failed: {e}");
            None
        }
    }
}

async fn reap_idle(pod: Arc<PodShared>, stop: CancellationToken) {
    let idle = pod.mesh.settings.pool_idle_timeout;
    let surplus = pod.mesh.settings.pool_surplus_idle_timeout.min(idle);
    let mut tick = tokio::time::interval((surplus / 4).max(std::time::Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => { pod.pool.reap(idle, surplus); }
        }
    }
}

async fn watch_policies(pod: Arc<PodShared>, stop: CancellationToken) {
    let mut updates = pod.mesh.directory.policy_updates();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = updates.changed() => {
                if r.is_err() {
                    return;
                }
                pod.reevaluate();
            }
        }
    }
}
