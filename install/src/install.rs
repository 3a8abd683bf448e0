//! The installer's actions on a node: put the plugin binary in place, chain the plugin into the
//! pod network's configuration (or write our own higher-priority copy of it), check, and undo.
//! Each action is idempotent: applied to a directory already in the desired state it writes
//! nothing, which is what keeps the watch loop from feeding on its own writes.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tracing::{info, warn};

use crate::cniconf::{self, Network, PLUGIN_TYPE};
use crate::files;

/// How the plugin is put into the node's CNI configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Edit the primary network's file: our entry is appended to its plugin list.
    Chained,
    /// Leave the primary's file alone and write this file (which must sort first) holding the
    /// primary's list plus our entry. For primary CNIs that rewrite their own file.
    OwnFile(String),
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The `ambit-cni` binary to install.
    pub plugin_binary: PathBuf,
    /// Our conflist entry (`type: ambit-cni` plus settings).
    pub entry: Value,
    pub mode: Mode,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Conf(#[from] cniconf::Error),
    #[error(
        "own file {own:?} would not be used: {primary} sorts before it; choose a name that sorts first (e.g. 00-ambit.conflist)"
    )]
    OwnFileLoses { own: String, primary: String },
    #[error("{0} exists and is not ours; refusing to overwrite it")]
    Foreign(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { what, path, source }
}

/// What one pass of [`install_config`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already in place: nothing written.
    Unchanged(PathBuf),
    /// Written (and, for a wrapped `.conf`, the original removed).
    Wrote(PathBuf),
    /// No pod network configured yet: nothing to chain into.
    NoPrimary,
}

impl Settings {
    pub fn binary_path(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_TYPE)
    }

    fn own_file(&self) -> Option<&str> {
        match &self.mode {
            Mode::Chained => None,
            Mode::OwnFile(f) => Some(f),
        }
    }

    fn scan(&self) -> Result<cniconf::Scan, Error> {
        let scan = cniconf::scan(&self.conf_dir, self.own_file())
            .map_err(io("reading", &self.conf_dir))?;
        for e in &scan.invalid_before {
            warn!(
                "an invalid CNI configuration sorts before the pod network (containerd 1.6 fails on it): {e}"
            );
        }
        Ok(scan)
    }
}

/// Copies the plugin into the CNI bin dir; returns whether it wrote.
pub fn install_binary(s: &Settings) -> Result<bool, Error> {
    let dst = s.binary_path();
    let wrote = files::install_binary(&s.plugin_binary, &dst).map_err(io("installing", &dst))?;
    if wrote {
        info!(path = %dst.display(), "plugin binary installed");
    }
    Ok(wrote)
}

/// Puts our entry into the configuration runtimes use, writing only if something differs.
pub fn install_config(s: &Settings) -> Result<Outcome, Error> {
    let scan = s.scan()?;
    let Some(primary) = scan.primary else {
        return Ok(Outcome::NoPrimary);
    };
    match &s.mode {
        Mode::Chained => chain(&primary, &s.entry),
        Mode::OwnFile(name) => own_file(&s.conf_dir, name, &primary, scan.own.as_ref(), &s.entry),
    }
}

fn chain(primary: &Network, entry: &Value) -> Result<Outcome, Error> {
    if !primary.wrapped && primary.has_entry(entry) {
        return Ok(Outcome::Unchanged(primary.path.clone()));
    }
    let list = cniconf::with_entry(primary, entry)?;
    let target = primary.target();
    if primary.wrapped && target.exists() {
        // A .conflist beside the single-plugin file that sorts first: overwrite it only if
        // it is an earlier wrap of ours.
        let ours = std::fs::read(&target)
            .ok()
            .and_then(|b| cniconf::parse(&target, &b).ok())
            .is_some_and(|n| n.entry().is_some());
        if !ours {
            return Err(Error::Foreign(target));
        }
    }
    let mode = files::mode_of(&primary.path).unwrap_or(0o644);
    files::write_atomic(&target, &cniconf::render(&list), mode).map_err(io("writing", &target))?;
    if primary.wrapped {
        files::remove(&primary.path).map_err(io("removing", &primary.path))?;
    }
    info!(
        file = %target.display(),
        network = primary.name(),
        primary = ?primary.primary_types(),
        wrapped_from = primary.wrapped.then(|| primary.path.display().to_string()),
        "ambit-cni chained into the pod network"
    );
    Ok(Outcome::Wrote(target))
}

fn own_file(
    dir: &Path,
    name: &str,
    primary: &Network,
    own: Option<&Network>,
    entry: &Value,
) -> Result<Outcome, Error> {
    let seen_name = primary
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if seen_name.as_str() < name {
        return Err(Error::OwnFileLoses {
            own: name.into(),
            primary: seen_name,
        });
    }
    let list = cniconf::with_entry(primary, entry)?;
    let path = dir.join(name);
    if own.is_some_and(|o| o.list == list) {
        return Ok(Outcome::Unchanged(path));
    }
    let mode = files::mode_of(&path)
        .or_else(|| files::mode_of(&primary.path))
        .unwrap_or(0o644);
    files::write_atomic(&path, &cniconf::render(&list), mode).map_err(io("writing", &path))?;
    info!(
        file = %path.display(),
        network = primary.name(),
        from = %seen_name,
        "own configuration written: the primary's plugins followed by ambit-cni"
    );
    Ok(Outcome::Wrote(path))
}

/// Is everything in place? `Err` says what is not.
pub fn check(s: &Settings) -> Result<PathBuf, String> {
    let bin = s.binary_path();
    let want = std::fs::read(&s.plugin_binary)
        .map_err(|e| format!("cannot read {}: {e}", s.plugin_binary.display()))?;
    if std::fs::read(&bin).ok().as_deref() != Some(want.as_slice()) {
        return Err(format!(
            "{} is missing or not the current build",
            bin.display()
        ));
    }
    let scan = s.scan().map_err(|e| e.to_string())?;
    let Some(primary) = scan.primary else {
        return Err(format!(
            "no pod network configuration in {} yet",
            s.conf_dir.display()
        ));
    };
    let used = match &s.mode {
        Mode::Chained => primary,
        Mode::OwnFile(name) => {
            let expected = cniconf::with_entry(&primary, &s.entry).map_err(|e| e.to_string())?;
            match scan.own {
                Some(own) if own.list == expected => own,
                _ => return Err(format!("{name} is missing or stale")),
            }
        }
    };
    if used.wrapped || !used.has_entry(&s.entry) {
        return Err(format!(
            "{} does not end with the current ambit-cni entry",
            used.path.display()
        ));
    }
    Ok(used.path)
}

/// Removes our entry from every configuration file, our own file, and the binary. Returns
/// what it changed.
pub fn uninstall(s: &Settings) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    if let Some(own) = s.own_file() {
        let p = s.conf_dir.join(own);
        if files::remove(&p).map_err(io("removing", &p))? {
            done.push(format!("removed {}", p.display()));
        }
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&s.conf_dir)
        .map_err(io("reading", &s.conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("conflist"))
        .collect();
    paths.sort();
    for path in paths {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(net) = cniconf::parse(&path, &bytes) else {
            continue;
        };
        if let Some(list) = cniconf::without_entry(&net) {
            let mode = files::mode_of(&path).unwrap_or(0o644);
            files::write_atomic(&path, &cniconf::render(&list), mode)
                .map_err(io("writing", &path))?;
            done.push(format!("removed ambit-cni from {}", path.display()));
        }
    }
    let bin = s.binary_path();
    if files::remove(&bin).map_err(io("removing", &bin))? {
        done.push(format!("removed {}", bin.display()));
    }
    for line in &done {
        info!("{line}");
    }
    Ok(done)
}

#[cfg(test)]
mod tests;
