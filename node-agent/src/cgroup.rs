//! The agent's cgroup (v2): what the pods' rules recognise the agent's sockets by.
//!
//! Every socket the agent opens inside a pod skips the redirect because it belongs to the
//! agent's cgroup (`socket cgroupv2` in the agent's exemption table, see
//! `ambit_common::redirect::AgentCgroup`). That is only as narrow as the cgroup: every process
//! in it is exempt too. So at start the agent makes sure it is alone in its cgroup — as in the
//! DaemonSet, where it is its container's only process — and otherwise moves itself into a
//! fresh child cgroup `ambit-agent.<pid>` (a hand-run agent on a bare host, whose shell's
//! cgroup holds other processes, or which sits in the hierarchy's root). It never falls back
//! to anything a pod could forge: without a usable cgroup v2 hierarchy it does not start.
//!
//! `ip netns exec` (as a hand-built node runs the agent) gives the agent a fresh `/sys` without
//! the cgroup mounts; then the agent mounts cgroup2 itself on a private temporary directory for
//! the moment it needs it, and removes the mount again.
//!
//! The level the kernel matches at is counted from the root of the cgroup namespace of the
//! process that installs the rule (Linux 6.1+ with the 2024 fix "nft_socket: make cgroupsv2
//! matching work with namespaces"), so the agent reports its depth below its own namespace's
//! root, which is what it sees in `/proc/self/cgroup`. On an older kernel, inside a private
//! cgroup namespace, the level is wrong and the match never succeeds: the agent's own
//! connections are then captured like the app's and fail — closed, never open.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ambit_common::redirect::AgentCgroup;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the agent is in no cgroup v2 hierarchy (/proc/self/cgroup has no \"0::\" line): it recognises its own sockets in pods by their cgroup v2 and needs a unified or hybrid cgroup setup"
    )]
    NoUnified,
    #[error(
        "no cgroup2 filesystem is mounted where the agent's cgroup {path} can be reached, and mounting one failed: {source}"
    )]
    NoMount {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the agent's cgroup {dir} also holds {others} other process(es), whose connections from pods would skip capture like the agent's; creating a cgroup of its own failed: {source} (run the agent in a cgroup of its own, e.g. its container's)"
    )]
    NotAlone {
        dir: PathBuf,
        others: usize,
        source: std::io::Error,
    },
}

/// Where the agent's cgroup is and how the rules match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnCgroup {
    /// Its directory in cgroupfs.
    pub dir: PathBuf,
    /// Its path below the agent's cgroup namespace root.
    pub path: String,
    pub matcher: AgentCgroup,
    /// Whether the agent created it at start (and removes it on a clean exit).
    pub created: bool,
}

/// Finds the agent's cgroup and makes sure the agent is alone in it (see the module doc).
pub fn settle() -> Result<OwnCgroup, Error> {
    with_unified(|mount| {
        let found = locate(mount)?;
        let others = other_processes(&found.dir)?;
        if others == 0 {
            return Ok(found);
        }
        let pid = std::process::id();
        let dir = found.dir.join(format!("ambit-agent.{pid}"));
        let moved = std::fs::create_dir(&dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .and_then(|()| std::fs::write(dir.join("cgroup.procs"), pid.to_string()));
        if let Err(source) = moved {
            let _ = std::fs::remove_dir(&dir);
            return Err(Error::NotAlone {
                dir: found.dir,
                others,
                source,
            });
        }
        remove_stale_siblings(&found.dir, pid);
        Ok(OwnCgroup {
            created: true,
            ..locate(mount)?
        })
    })
}

impl OwnCgroup {
    /// On a clean exit: leaves the cgroup the agent created and removes it. Best effort; a
    /// leftover empty `ambit-agent.<pid>` is removed by the next agent started beside it.
    pub fn release(&self) {
        if !self.created {
            return;
        }
        let _ = with_unified(|mount| {
            let own = locate(mount)?;
            if let Some(parent) = own.dir.parent()
                && std::fs::write(parent.join("cgroup.procs"), std::process::id().to_string())
                    .is_ok()
            {
                let _ = std::fs::remove_dir(&own.dir);
            }
            Ok(())
        });
    }
}

/// Runs `f` with the cgroup2 mount to use: the one visible in `/proc/self/mountinfo` (`None`),
/// or, when there is none, a private mount made for the call and removed after it.
fn with_unified<T>(f: impl FnOnce(Option<&Path>) -> Result<T, Error>) -> Result<T, Error> {
    let mounts = read(Path::new("/proc/self/mountinfo"))?;
    if cgroup_dir(&mounts, "/").is_some() {
        return f(None);
    }
    let tmp = std::env::temp_dir().join(format!("ambit-cgroup2.{}", std::process::id()));
    let mount = std::fs::create_dir_all(&tmp)
        .and_then(|()| {
            nix::mount::mount(
                Some("cgroup2"),
                &tmp,
                Some("cgroup2"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(std::io::Error::from)
        })
        .map_err(|source| {
            let _ = std::fs::remove_dir(&tmp);
            Error::NoMount {
                path: "/".into(),
                source,
            }
        });
    mount?;
    let out = f(Some(&tmp));
    let _ = nix::mount::umount2(&tmp, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&tmp);
    out
}

/// The directory of the root of the calling process's cgroup namespace on the unified
/// hierarchy as mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
pub fn unified_root() -> Result<PathBuf, Error> {
    let mounts = read(Path::new("/proc/self/mountinfo"))?;
    cgroup_dir(&mounts, "/").ok_or_else(|| Error::NoMount {
        path: "/".into(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The agent's cgroup, under `mount` (a cgroup2 mount of the agent's namespace root) or else
/// under the cgroup2 mount of the mount table.
fn locate(mount: Option<&Path>) -> Result<OwnCgroup, Error> {
    let path = unified_path(&read(Path::new("/proc/self/cgroup"))?).ok_or(Error::NoUnified)?;
    let dir = match mount {
        Some(m) => Some(m.join(path.trim_start_matches('/'))),
        None => cgroup_dir(&read(Path::new("/proc/self/mountinfo"))?, &path),
    }
    .ok_or_else(|| Error::NoMount {
        path: path.clone(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let meta = std::fs::metadata(&dir).map_err(|source| Error::Read {
        path: dir.clone(),
        source,
    })?;
    Ok(OwnCgroup {
        // The kernel's cgroup id is the directory's inode number in cgroupfs (kernfs, 64-bit).
        matcher: AgentCgroup {
            id: meta.ino(),
            level: level_of(&path),
        },
        dir,
        path,
        created: false,
    })
}

/// The path on the unified hierarchy's line (`0::/a/b`) of `/proc/<pid>/cgroup`.
fn unified_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_string())
}

/// Depth below the namespace root: `/` is 0, `/a/b` is 2.
fn level_of(path: &str) -> u32 {
    path.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// The directory of cgroup `path` under a cgroup2 mount whose root contains it. Mountinfo
/// fields: id, parent, major:minor, root, mount point, options, optional fields, "-", type, ...
fn cgroup_dir(mountinfo: &str, path: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut f = pre.split_whitespace();
        let root = f.nth(3)?;
        let mount = unescape(f.next()?);
        let rel = if root == "/" {
            path.trim_start_matches('/')
        } else {
            path.strip_prefix(root)
                .filter(|r| r.is_empty() || r.starts_with('/'))?
                .trim_start_matches('/')
        };
        Some(Path::new(&mount).join(rel))
    })
}

/// Mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Processes in `dir` other than this one (its threads are one process in `cgroup.procs`).
fn other_processes(dir: &Path) -> Result<usize, Error> {
    let me = std::process::id().to_string();
    Ok(read(&dir.join("cgroup.procs"))?
        .lines()
        .filter(|p| !p.is_empty() && *p != me)
        .count())
}

/// Removes `ambit-agent.<pid>` cgroups under `parent` left by agents that are gone (the
/// kernel refuses to remove a cgroup that still holds a process, so a live one is never lost).
fn remove_stale_siblings(parent: &Path, me: u32) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ambit-agent."))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_line_gives_the_path_and_its_depth() {
        let v1_and_v2 = "4:memory:/x\n1:cpu:/\n0::/kubepods/burstable/pod1/abc\n";
        let p = unified_path(v1_and_v2).unwrap();
        assert_eq!(p, "/kubepods/burstable/pod1/abc");
        assert_eq!(level_of(&p), 4);
        assert_eq!(level_of("/"), 0);
        assert_eq!(unified_path("4:memory:/x\n"), None, "cgroup v1 only");
    }

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_namespaced_hosts() {
        let hybrid = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw
31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
40 30 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup_dir(hybrid, "/ambit-test/x"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/ambit-test/x"))
        );
        assert_eq!(
            cgroup_dir(hybrid, "/"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/"))
        );
        // A mount of a subtree (bind-mounted cgroup dir): the path must lie below its root.
        let sub = "50 1 0:35 /kubepods/pod1 /host\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_dir(sub, "/kubepods/pod1/c"),
            Some(PathBuf::from("/host cg/c"))
        );
        assert_eq!(cgroup_dir(sub, "/elsewhere"), None);
        assert_eq!(cgroup_dir(sub, "/kubepods/pod10/c"), None);
        assert_eq!(cgroup_dir("", "/"), None);
    }
}
