//! The listeners of one captured pod.

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::passthrough::{self, Direction, PodContext};
use crate::socket::SocketFactory;

pub use ambit_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// A running pod proxy; dropping it (or [`PodProxy::stop`]) closes its listeners and cuts its
/// connections.
pub struct PodProxy {
    stop: CancellationToken,
}

impl PodProxy {
    /// Binds all three listeners (synchronously, so the caller can ack the plugin only once
    /// they exist) and starts serving them. Must be called inside a tokio runtime.
    pub fn start(factory: Arc<dyn SocketFactory>, pod: PodContext) -> io::Result<Self> {
        let out = TcpListener::from_std(factory.listener(OUTBOUND_PORT)?)?;
        let inb = TcpListener::from_std(factory.listener(INBOUND_PLAINTEXT_PORT)?)?;
        let hbone = TcpListener::from_std(factory.listener(INBOUND_HBONE_PORT)?)?;
        let stop = CancellationToken::new();
        let pod = Arc::new(pod);
        tokio::spawn(passthrough::serve(
            Direction::Outbound,
            out,
            factory.clone(),
            pod.clone(),
            stop.clone(),
        ));
        tokio::spawn(passthrough::serve(
            Direction::Inbound,
            inb,
            factory,
            pod.clone(),
            stop.clone(),
        ));
        tokio::spawn(hold_hbone(hbone, pod, stop.clone()));
        Ok(Self { stop })
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// 15008 is bound so the port is owned by the pod's proxy; until HBONE termination lands, a
/// connection to it is closed at once.
async fn hold_hbone(listener: TcpListener, pod: Arc<PodContext>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => {
                if let Ok((_, peer)) = r {
                    debug!(pod = %pod.name, %peer, "HBONE connection closed: not served yet");
                }
            }
        }
    }
}
