//! The plugin socket: a Unix stream socket, mode 0600, peers checked with SO_PEERCRED.
//! One request and one response per connection (see `ambit_common::protocol`).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_common::enrollment::{Answer, Enrollment};
use ambit_common::netns::Netns;
use ambit_common::protocol::{self, Detail, MAX_FRAME, Request, Response};
use sendfd::RecvWithFd;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::Store;
use crate::workloads::Manager;

/// A client must deliver its whole request within this time (no slow-loris on the socket).
const READ_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare socket directory {dir}: {source}")]
    Dir { dir: String, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: String, source: io::Error },
}

/// Binds the socket, creating its directory and replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| Error::Dir {
                dir: dir.display().to_string(),
                source,
            })?;
    }
    let bind_err = |source| Error::Bind {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(bind_err(e)),
        _ => {}
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(l)
}

/// Identifies the socket file at `path` (to tell our socket from a successor's): device,
/// inode and change time — an inode number alone is reused as soon as a file is replaced.
pub fn identity(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

pub async fn serve(
    listener: UnixListener,
    mgr: Arc<Manager>,
    allow_uids: Arc<Vec<u32>>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("plugin socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (mgr, allow) = (mgr.clone(), allow_uids.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, mgr, &allow).await {
                debug!("plugin connection ended: {e}");
            }
        });
    }
}

async fn handle(mut stream: UnixStream, mgr: Arc<Manager>, allow: &[u32]) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    if !allow.contains(&cred.uid()) {
        warn!(uid = cred.uid(), pid = ?cred.pid(), "plugin socket: peer refused (uid not allowed)");
        return reply(&mut stream, Response::error("peer uid is not allowed")).await;
    }
    let start = Instant::now();
    let (body, fds) = match tokio::time::timeout(READ_DEADLINE, read_frame(&stream)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            debug!("bad request frame: {e}");
            return reply(&mut stream, Response::error(format!("bad request: {e}"))).await;
        }
        Err(_) => return reply(&mut stream, Response::error("request not received in time")).await,
    };
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                &mut stream,
                Response::error(format!("malformed request: {e}")),
            )
            .await;
        }
    };
    let command = match &req {
        Request::Add { .. } => "ADD",
        Request::Del { .. } => "DEL",
        Request::Check { .. } => "CHECK",
        Request::Status => "STATUS",
        Request::Gc { .. } => "GC",
        Request::Enrollment { .. } => "ENROLLMENT",
    };
    // Capturing a pod switches namespaces, creates sockets, fsyncs its record and generates a
    // key: blocking work, kept off the runtime threads that carry every pod's traffic.
    let resp = {
        let mgr = mgr.clone();
        tokio::task::spawn_blocking(move || dispatch(req, fds, &mgr))
            .await
            .unwrap_or_else(|e| Response::error(format!("request handler failed: {e}")))
    };
    mgr.metrics.cni(command, resp.ok);
    if command == "ADD" && resp.ok {
        mgr.metrics
            .handoff_seconds
            .observe(start.elapsed().as_secs_f64());
    }
    debug!(
        elapsed_us = start.elapsed().as_micros() as u64,
        ok = resp.ok,
        "plugin request served"
    );
    reply(&mut stream, resp).await
}

fn dispatch(req: Request, mut fds: Vec<OwnedFd>, mgr: &Manager) -> Response {
    match req {
        Request::Add { pod } => {
            if fds.len() != 1 {
                return Response::error(format!(
                    "add needs exactly one descriptor (the pod's network namespace), got {}",
                    fds.len()
                ));
            }
            let fd = fds.remove(0);
            let netns = match Netns::from_fd(fd, "the descriptor sent with add") {
                Ok(n) => n,
                Err(e) => {
                    warn!(container_id = %pod.container_id, "add refused: {e}");
                    return Response::error(e.to_string());
                }
            };
            match mgr.add(*pod, netns) {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(e.to_string()),
            }
        }
        _ if !fds.is_empty() => Response::error("only add may carry a descriptor"),
        Request::Del { container_id } => {
            mgr.del(&container_id);
            Response::ok()
        }
        Request::Check { container_id } => match mgr.check(&container_id) {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e),
        },
        Request::Status => {
            let pending = mgr.store().pending_sources();
            if !mgr.ready() {
                Response::error("agent is still re-adopting pods after a restart")
            } else if !pending.is_empty() {
                Response::error(format!(
                    "agent is waiting for its first snapshot from {pending:?}"
                ))
            } else {
                Response::ok()
            }
        }
        Request::Enrollment {
            namespace,
            name,
            uid,
        } => enrollment(mgr.store(), &namespace, &name, &uid, ENROLLMENT_WAIT),
        Request::Gc { valid } => {
            let removed = mgr.gc(&valid);
            if !removed.is_empty() {
                info!(?removed, "GC released pods");
            }
            Response {
                ok: true,
                error: None,
                detail: Some(Detail::Gc { removed }),
            }
        }
    }
}

/// How long an enrollment question waits for the pod's object to reach the agent (a watch
/// lags the API server by a little; kubelet creates the sandbox only after the pod exists).
/// Within the plugin's default 10 s agent timeout.
pub const ENROLLMENT_WAIT: Duration = Duration::from_secs(4);

/// Answers "capture this pod?" from the store, waiting up to `wait` for the pod to be known.
/// Runs on a blocking thread.
pub fn enrollment(
    store: &Store,
    namespace: &str,
    name: &str,
    uid: &str,
    wait: Duration,
) -> Response {
    if !store.has_sources() {
        return Response::error(
            "enrollment by labels needs the agent to know Pod objects: run it with --kubernetes or --manifests-dir",
        );
    }
    let deadline = Instant::now() + wait;
    loop {
        let pending = store.pending_sources();
        let answer = store.enrollment(namespace, name, uid);
        let (capture, reason) = match answer {
            Enrollment::Capture(r) => (true, r),
            Enrollment::Skip(r) => (false, r),
            Enrollment::Undecided if let Some(why) = store.elsewhere(namespace, name, uid) => {
                return Response::error(why);
            }
            Enrollment::Undecided if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(25));
                continue;
            }
            Enrollment::Undecided if !pending.is_empty() => {
                return Response::error(format!(
                    "not yet synced with {pending:?} (is the API server reachable?), so pod {namespace}/{name} is unknown"
                ));
            }
            Enrollment::Undecided => {
                return Response::error(format!(
                    "pod {namespace}/{name} (uid {uid:?}) is not known to the agent after {wait:?}"
                ));
            }
        };
        info!(pod = %format!("{namespace}/{name}"), capture, reason, "enrollment decided");
        return Response {
            ok: true,
            error: None,
            detail: Some(Detail::Enrollment(Answer {
                capture,
                reason: reason.into(),
            })),
        };
    }
}

/// Reads one frame; descriptors arriving with any chunk are collected (and closed on drop).
async fn read_frame(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4 + MAX_FRAME];
    let mut filled = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        stream.readable().await?;
        let mut raw = [0; 4];
        let r = stream.try_io(Interest::READABLE, || {
            stream.recv_with_fd(&mut buf[filled..], &mut raw)
        });
        let (n, nfds) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        fds.extend(
            raw[..nfds]
                .iter()
                .map(|fd| ambit_common::sys::owned_from_received(*fd)),
        );
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated frame",
            ));
        }
        filled += n;
        if filled >= 4 {
            let len = protocol::frame_len(buf[..4].try_into().expect("4 bytes"))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if filled >= 4 + len {
                if filled > 4 + len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "trailing bytes after frame",
                    ));
                }
                buf.truncate(4 + len);
                buf.drain(..4);
                return Ok((buf, fds));
            }
        }
    }
}

async fn reply(stream: &mut UnixStream, resp: Response) -> io::Result<()> {
    let frame = protocol::encode(&resp).map_err(io::Error::other)?;
    stream.write_all(&frame).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_creates_a_missing_directory_and_replaces_a_stale_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/ambit/cni.sock");
        let l = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o755);
        let first = identity(&path);
        drop(l);
        // The file of a dead agent is still there: a new bind replaces it.
        let _l = bind(&path).unwrap();
        assert!(identity(&path).is_some() && identity(&path) != first);
    }
}
