//! The plugin ⇄ agent protocol over the agent's Unix stream socket.
//!
//! Each message is a frame: a 4-byte big-endian length, then that many bytes of JSON. An `add`
//! request carries exactly one descriptor (the pod's network namespace) as SCM_RIGHTS ancillary
//! data attached to its first byte; every other message carries none. The client sends one
//! request and reads one [`Response`] per connection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendfd::SendWithFd;
use serde::{Deserialize, Serialize};

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// What the plugin knows about a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// CNI_CONTAINERID: the sandbox id; the key of a captured pod.
    pub container_id: String,
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// CNI_NETNS as the runtime gave it: used to reopen the namespace after an agent restart.
    pub netns_path: PathBuf,
    /// The rule set the plugin installed, so the agent can verify and repair it. Absent in
    /// records written before it existed (those pods are not verified).
    #[serde(default)]
    pub rules: Option<crate::redirect::RuleSet>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Capture a pod; carries the netns fd.
    Add { pod: Box<PodInfo> },
    /// Forget a pod (idempotent).
    Del { container_id: String },
    /// Is the pod served (listeners bound in the expected netns)?
    Check { container_id: String },
    /// Is the agent ready to serve ADD?
    Status,
    /// Forget every pod whose container id is not listed.
    Gc { valid: Vec<String> },
    /// Should this pod be captured, by its Kubernetes labels and its namespace's (plugin
    /// setting `"enrollment": "labels"`)? The answer is [`Detail::Enrollment`]; an error
    /// means the agent cannot tell yet (fail closed).
    Enrollment {
        namespace: String,
        name: String,
        #[serde(default)]
        uid: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Command-specific facts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
}

/// What a command answers besides ok/error. Untagged: each shape is its own JSON object
/// (`{"capture": …, "reason": …}`, `{"removed": […]}`), as the protocol always sent them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Detail {
    Enrollment(crate::enrollment::Answer),
    /// GC: the container ids of the pods released.
    Gc {
        removed: Vec<String>,
    },
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            detail: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("agent socket I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Encodes one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(Error::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Validates a frame header and returns the body length.
pub fn frame_len(header: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(Error::TooLarge(len));
    }
    Ok(len)
}

/// Blocking client used by the CNI plugin.
pub fn call(
    socket: &Path,
    req: &Request,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<Response, Error> {
    let mut s = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let frame = encode(req)?;
    let fds: Vec<_> = netns.iter().map(|fd| fd.as_raw_fd()).collect();
    let sent = s.send_with_fd(&frame, &fds)?;
    s.write_all(&frame[sent..])?;
    let timed_out = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Error::Timeout(timeout)
        } else {
            Error::Io(e)
        }
    };
    let mut header = [0u8; 4];
    s.read_exact(&mut header).map_err(timed_out)?;
    let mut body = vec![0u8; frame_len(header)?];
    s.read_exact(&mut body).map_err(timed_out)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let req = Request::Gc {
            valid: vec!["a".into()],
        };
        let f = encode(&req).unwrap();
        let len = frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, f.len() - 4);
        let back: Request = serde_json::from_slice(&f[4..]).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
    }

    #[test]
    fn answers_keep_their_wire_shape() {
        let enrolled = Response {
            ok: true,
            error: None,
            detail: Some(Detail::Enrollment(crate::enrollment::Answer {
                capture: true,
                reason: "r".into(),
            })),
        };
        let wire = serde_json::to_string(&enrolled).unwrap();
        assert_eq!(
            wire,
            r#"{"ok":true,"detail":{"capture":true,"reason":"r"}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&wire).unwrap(), enrolled);
        let gc: Response =
            serde_json::from_str(r#"{"ok":true,"detail":{"removed":["a"]}}"#).unwrap();
        assert_eq!(
            gc.detail,
            Some(Detail::Gc {
                removed: vec!["a".into()]
            })
        );
    }

    #[test]
    fn oversized_frames_are_refused() {
        assert!(matches!(
            frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()),
            Err(Error::TooLarge(_))
        ));
        let huge = Request::Gc {
            valid: vec!["x".repeat(MAX_FRAME)],
        };
        assert!(matches!(encode(&huge), Err(Error::TooLarge(_))));
    }

    mod fuzz {
        use super::*;
        use crate::testing::{json, text};
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "op",
            "pod",
            "container_id",
            "valid",
            "namespace",
            "name",
            "uid",
            "ips",
            "netns_path",
            "rules",
            "ifname",
            "annotations",
            "add",
            "del",
            "gc",
            "enrollment",
        ];

        proptest! {
            #[test]
            fn fuzz_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                if bytes.len() >= 4 {
                    let _ = frame_len(bytes[..4].try_into().unwrap());
                }
                let _ = serde_json::from_slice::<Request>(&bytes);
                let _ = serde_json::from_slice::<Response>(&bytes);
            }

            #[test]
            fn fuzz_json_requests_decode_or_fail_cleanly(v in json(KEYS)) {
                if let Ok(req) = serde_json::from_value::<Request>(v) {
                    // Whatever decodes re-encodes (or is refused as too large), never panics.
                    let _ = encode(&req);
                }
            }

            #[test]
            fn fuzz_requests_round_trip(id in text(), ns in text(), name in text(), uid in text()) {
                for req in [
                    Request::Del { container_id: id.clone() },
                    Request::Enrollment { namespace: ns.clone(), name: name.clone(), uid: uid.clone() },
                    Request::Gc { valid: vec![id.clone(), uid.clone()] },
                ] {
                    let f = encode(&req).unwrap();
                    let back: Request = serde_json::from_slice(&f[4..]).unwrap();
                    prop_assert_eq!(back, req);
                }
            }
        }
    }
}
