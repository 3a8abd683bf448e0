//! A verified handle on a network namespace.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is not a network namespace")]
    NotNetns { what: String },
    #[error("cannot inspect {what}: {source}")]
    Inspect {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {id}: {source}")]
    Enter { id: NetnsId, source: std::io::Error },
}

/// Identity of a namespace: the (device, inode) pair of its nsfs file. Stable for the
/// namespace's lifetime and never reused while a handle is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]@{}", self.ino, self.dev)
    }
}

/// An open, verified network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: NetnsId,
}

impl Netns {
    /// Opens a namespace by path (`/var/run/netns/x`, `/proc/<pid>/ns/net`) and verifies it.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_fd(file.into(), &path.display().to_string())
    }

    /// Wraps a descriptor (e.g. received over SCM_RIGHTS) after checking that it really is a
    /// network namespace. `what` names it in errors.
    pub fn from_fd(fd: OwnedFd, what: &str) -> Result<Self, Error> {
        let is_netns = sys::is_net_namespace(fd.as_fd()).map_err(|source| Error::Inspect {
            what: what.to_owned(),
            source,
        })?;
        if !is_netns {
            return Err(Error::NotNetns {
                what: what.to_owned(),
            });
        }
        let meta = File::from(fd.try_clone().map_err(|source| Error::Inspect {
            what: what.to_owned(),
            source,
        })?)
        .metadata()
        .map_err(|source| Error::Inspect {
            what: what.to_owned(),
            source,
        })?;
        Ok(Self {
            fd,
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// The namespace the calling thread is in now.
    pub fn current_thread() -> Result<Self, Error> {
        let fd = sys::open_thread_netns().map_err(|source| Error::Open {
            path: "/proc/thread-self/ns/net".into(),
            source,
        })?;
        Self::from_fd(fd, "/proc/thread-self/ns/net")
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Runs a synchronous closure inside this namespace on the calling thread, then restores
    /// the thread's namespace. Never `.await` inside `f`.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, Error> {
        sys::run_in_netns(self.fd.as_fd(), f).map_err(|source| Error::Enter {
            id: self.id,
            source,
        })
    }

    /// Duplicates the handle (used to pass the namespace to another process).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            id: self.id,
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_a_netns() {
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let again = Netns::current_thread().unwrap();
        assert_eq!(ns.id(), again.id());
    }

    #[test]
    fn other_files_are_rejected() {
        let err = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, Error::NotNetns { .. }), "{err}");
        // A namespace of another type is not a network namespace either.
        let err = Netns::open(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert!(matches!(err, Error::NotNetns { .. }), "{err}");
        let err = Netns::open(Path::new("/nonexistent/ns")).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err}");
    }

    /// A namespace of its own (`ip netns add`, root), deleted on drop.
    struct Scratch(String);

    impl Scratch {
        fn new() -> Self {
            let name = format!("ambit-unit-{}", std::process::id());
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "`ip netns add {name}` failed: the test needs root and iproute2"
            );
            Self(name)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    #[test]
    fn run_enters_the_namespace_and_returns_to_the_original_one() {
        let scratch = Scratch::new();
        let ns = Netns::open(Path::new(&format!("/var/run/netns/{}", scratch.0))).unwrap();
        let before = Netns::current_thread().unwrap().id();
        assert_ne!(ns.id(), before, "the scratch namespace is another one");
        let inside = ns.run(|| Netns::current_thread().unwrap().id()).unwrap();
        assert_eq!(inside, ns.id(), "the closure ran inside the namespace");
        assert_eq!(Netns::current_thread().unwrap().id(), before);
    }
}
