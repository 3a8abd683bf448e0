//! The listeners of one captured pod, and what they share.

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::hbone;
use crate::identity::Identity;
use crate::mesh::Mesh;
use crate::passthrough::{self, Direction, PodContext};
use crate::socket::SocketFactory;

pub use ambit_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// State shared by a pod's listeners and connections.
pub struct PodShared {
    pub ctx: PodContext,
    pub factory: Arc<dyn SocketFactory>,
    pub mesh: Arc<Mesh>,
    pub pool: hbone::client::Pool,
}

impl PodShared {
    /// The pod's identity now (its Pod object may arrive after the CNI ADD).
    pub fn identity(&self) -> Identity {
        self.mesh
            .directory
            .identity_of(&self.ctx.namespace, &self.ctx.name)
    }
}

/// A running pod proxy; dropping it (or [`PodProxy::stop`]) closes its listeners and cuts its
/// connections.
pub struct PodProxy {
    stop: CancellationToken,
    shared: Arc<PodShared>,
}

impl PodProxy {
    /// Binds all three listeners (synchronously, so the caller can ack the plugin only once
    /// they exist) and starts serving them. Must be called inside a tokio runtime.
    pub fn start(
        factory: Arc<dyn SocketFactory>,
        ctx: PodContext,
        mesh: Arc<Mesh>,
    ) -> io::Result<Self> {
        let out = TcpListener::from_std(factory.listener(OUTBOUND_PORT)?)?;
        let inb = TcpListener::from_std(factory.listener(INBOUND_PLAINTEXT_PORT)?)?;
        let hbone = TcpListener::from_std(factory.listener(INBOUND_HBONE_PORT)?)?;
        let stop = CancellationToken::new();
        let shared = Arc::new(PodShared {
            ctx,
            pool: hbone::client::Pool::new(factory.clone(), mesh.clone()),
            factory,
            mesh,
        });
        tokio::spawn(passthrough::serve(
            Direction::Outbound,
            out,
            shared.clone(),
            stop.clone(),
        ));
        tokio::spawn(passthrough::serve(
            Direction::Inbound,
            inb,
            shared.clone(),
            stop.clone(),
        ));
        tokio::spawn(hbone::server::serve(hbone, shared.clone(), stop.clone()));
        tokio::spawn(reap_idle(shared.clone(), stop.clone()));
        Ok(Self { stop, shared })
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Open pooled HBONE connections of this pod.
    pub fn pooled_connections(&self) -> usize {
        self.shared.pool.connections()
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn reap_idle(pod: Arc<PodShared>, stop: CancellationToken) {
    let idle = pod.mesh.settings.pool_idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).max(std::time::Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => { pod.pool.reap(idle); }
        }
    }
}
