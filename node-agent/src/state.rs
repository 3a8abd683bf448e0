//! The record of captured pods: one JSON file per pod in the state directory, written
//! atomically (temporary file, then rename), read back when the agent starts.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ambit_common::netns::NetnsId;
use ambit_common::protocol::PodInfo;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Bumped when the record's meaning changes; older records are migrated or dropped.
pub const STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub version: u32,
    pub pod: PodInfo,
    /// Identity of the namespace when it was captured; a reopened path must match it.
    pub netns: NetnsId,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Dir {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, container_id: &str) -> PathBuf {
        // Container ids are validated by the plugin ([A-Za-z0-9][A-Za-z0-9_.-]*); never trust
        // that here: anything else is encoded so it cannot escape the directory.
        let safe: String = container_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("pod-{safe}.json"))
    }

    pub fn save(&self, rec: &PodRecord) -> Result<(), Error> {
        let path = self.path(&rec.pod.container_id);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| Error::Write { path, source })
    }

    pub fn remove(&self, container_id: &str) {
        let path = self.path(container_id);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %path.display(), "cannot remove pod record: {e}");
        }
    }

    /// Every readable record. A corrupt file is moved aside (`.corrupt`) and reported; a record
    /// from another version is dropped with a warning; neither stops the agent.
    pub fn load(&self) -> Result<Vec<PodRecord>, Error> {
        let entries = fs::read_dir(&self.dir).map_err(|source| Error::Dir {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("pod-") && name.ends_with(".json")) {
                continue;
            }
            let parsed = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            });
            let value = match parsed {
                Ok(v) => v,
                Err(e) => {
                    warn!(path = %path.display(), "corrupt pod record ({e}); moved aside");
                    let _ = fs::rename(&path, path.with_extension("corrupt"));
                    continue;
                }
            };
            let version = value.get("version").and_then(|v| v.as_u64());
            if version != Some(u64::from(STATE_VERSION)) {
                warn!(path = %path.display(), ?version, "pod record from another version; dropped");
                let _ = fs::remove_file(&path);
                continue;
            }
            match serde_json::from_value::<PodRecord>(value) {
                Ok(r) => out.push(r),
                Err(e) => {
                    warn!(path = %path.display(), "corrupt pod record ({e}); moved aside");
                    let _ = fs::rename(&path, path.with_extension("corrupt"));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> PodRecord {
        PodRecord {
            version: STATE_VERSION,
            pod: PodInfo {
                container_id: id.into(),
                ifname: "eth0".into(),
                namespace: "default".into(),
                name: "p".into(),
                uid: String::new(),
                ips: vec!["10.0.0.2".parse().unwrap()],
                annotations: Default::default(),
                netns_path: "/var/run/netns/x".into(),
                rules: None,
            },
            netns: NetnsId {
                dev: 4,
                ino: 4026532000,
            },
        }
    }

    #[test]
    fn save_load_remove() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(&d.path().join("state")).unwrap();
        s.save(&rec("abc")).unwrap();
        s.save(&rec("def")).unwrap();
        let mut got = s.load().unwrap();
        got.sort_by(|a, b| a.pod.container_id.cmp(&b.pod.container_id));
        assert_eq!(got, vec![rec("abc"), rec("def")]);
        s.remove("abc");
        s.remove("abc");
        assert_eq!(s.load().unwrap(), vec![rec("def")]);
    }

    #[test]
    fn corrupt_and_foreign_records_do_not_stop_loading() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        s.save(&rec("good")).unwrap();
        fs::write(d.path().join("pod-bad.json"), b"{truncated").unwrap();
        fs::write(d.path().join("pod-old.json"), br#"{"version":0,"pod":{}}"#).unwrap();
        fs::write(d.path().join("pod-wrong.json"), br#"{"version":1,"pod":5}"#).unwrap();
        assert_eq!(s.load().unwrap(), vec![rec("good")]);
        assert!(d.path().join("pod-bad.corrupt").exists());
        assert!(d.path().join("pod-wrong.corrupt").exists());
        assert!(!d.path().join("pod-old.json").exists());
    }

    #[test]
    fn ids_cannot_escape_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        assert_eq!(s.path("../../etc/x").parent(), Some(d.path()));
    }
}
