//! The node's CNI configuration directory as container runtimes read it, and the edits the
//! installer makes to it. Everything here is pure (bytes in, bytes out) except [`scan`], which
//! only reads.
//!
//! How runtimes choose the network (libcni `ConfFiles` + the CRI plugins of containerd and
//! CRI-O): files ending in `.conf`, `.conflist` or `.json`, in lexical order of their names; the
//! first one that loads is the pod network. A `.conflist` must have a `name` and a non-empty
//! `plugins` list whose entries each have a `type`; any other file is a single plugin
//! configuration that must have a `type`. containerd 1.6 stops at the first file even when it
//! does not load, so an invalid file that sorts first is reported loudly.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Our plugin's `type` (its binary name in the CNI bin dir).
pub const PLUGIN_TYPE: &str = "ambit-cni";

/// Versions `ambit-cni` speaks; a network of any other version cannot chain it.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{path}: not valid JSON: {why}")]
    Json { path: String, why: String },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    #[error(
        "{path}: network {name:?} has cniVersion {version:?}; ambit-cni supports {}, so it cannot be chained into it",
        SUPPORTED_VERSIONS.join(", ")
    )]
    Version {
        path: String,
        name: String,
        version: String,
    },
    #[error("our entry must be a JSON object with \"type\": \"{PLUGIN_TYPE}\"")]
    Entry,
}

/// A loaded configuration file, always in list form.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    /// The file it was read from.
    pub path: PathBuf,
    /// The list (`name`, `cniVersion`, `plugins`, and any other field the file had).
    pub list: Map<String, Value>,
    /// The file was a single plugin (`.conf`/`.json`) and was wrapped into a list.
    pub wrapped: bool,
}

impl Network {
    /// Where the list form lives: the file itself, or for a wrapped single plugin the
    /// `.conflist` beside it.
    pub fn target(&self) -> PathBuf {
        if self.wrapped {
            self.path.with_extension("conflist")
        } else {
            self.path.clone()
        }
    }

    pub fn name(&self) -> &str {
        self.list.get("name").and_then(Value::as_str).unwrap_or("")
    }

    pub fn version(&self) -> &str {
        self.list
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn plugins(&self) -> &[Value] {
        self.list
            .get("plugins")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    /// The primary's plugin types, ours excluded (for logs).
    pub fn primary_types(&self) -> Vec<&str> {
        self.plugins()
            .iter()
            .filter_map(plugin_type)
            .filter(|t| *t != PLUGIN_TYPE)
            .collect()
    }

    /// Our entry, if the list has one.
    pub fn entry(&self) -> Option<&Value> {
        self.plugins()
            .iter()
            .find(|p| plugin_type(p) == Some(PLUGIN_TYPE))
    }

    /// Our entry is present, equal to `entry`, and last.
    pub fn has_entry(&self, entry: &Value) -> bool {
        self.plugins().last() == Some(entry)
    }
}

fn plugin_type(p: &Value) -> Option<&str> {
    p.get("type").and_then(Value::as_str)
}

fn is_candidate(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("conf" | "conflist" | "json")
    )
}

/// Parses one file the way runtimes do.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Network, Error> {
    let p = path.display().to_string();
    let invalid = |why: &str| Error::Invalid {
        path: p.clone(),
        why: why.to_string(),
    };
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
        path: p.clone(),
        why: e.to_string(),
    })?;
    let Value::Object(obj) = value else {
        return Err(invalid("the top level must be a JSON object"));
    };
    if let Some(v) = obj.get("cniVersion")
        && !v.is_string()
    {
        return Err(invalid("cniVersion must be a string"));
    }
    let is_list = path.extension().and_then(|e| e.to_str()) == Some("conflist");
    if is_list {
        if obj
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            return Err(invalid("a .conflist needs a non-empty \"name\""));
        }
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("a .conflist needs a \"plugins\" list"))?;
        if plugins.is_empty() {
            return Err(invalid("\"plugins\" is empty"));
        }
        if let Some(i) = plugins
            .iter()
            .position(|p| plugin_type(p).unwrap_or("").is_empty())
        {
            return Err(invalid(&format!("plugins[{i}] has no \"type\"")));
        }
        Ok(Network {
            path: path.to_owned(),
            list: obj,
            wrapped: false,
        })
    } else {
        if plugin_type(&Value::Object(obj.clone()))
            .unwrap_or("")
            .is_empty()
        {
            return Err(invalid("a single-plugin configuration needs a \"type\""));
        }
        // Wrapped the way libcni's ConfListFromConf does: name and version lifted to the list.
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = obj.get(key) {
                list.insert(key.into(), v.clone());
            }
        }
        list.insert("plugins".into(), Value::Array(vec![Value::Object(obj)]));
        Ok(Network {
            path: path.to_owned(),
            list,
            wrapped: true,
        })
    }
}

/// What [`scan`] found in the directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// The network runtimes use: the first file that loads.
    pub primary: Option<Network>,
    /// Files that sort before the primary but do not load (containerd 1.6 fails on them).
    pub invalid_before: Vec<Error>,
    /// Our own file (own-file mode), if present and loadable.
    pub own: Option<Network>,
}

/// Reads the configuration directory. `own_file` (own-file mode) is skipped when choosing the
/// primary: it is ours.
pub fn scan(dir: &Path, own_file: Option<&str>) -> std::io::Result<Scan> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_candidate(p))
        .collect();
    files.sort();
    let mut out = Scan::default();
    for path in files {
        let is_own = own_file.is_some_and(|o| path.file_name() == Some(o.as_ref()));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let parsed = parse(&path, &bytes);
        if is_own {
            out.own = parsed.ok();
            continue;
        }
        match parsed {
            Ok(n) if out.primary.is_none() => out.primary = Some(n),
            Ok(_) => {}
            Err(e) if out.primary.is_none() => out.invalid_before.push(e),
            Err(_) => {}
        }
    }
    Ok(out)
}

fn check_entry(entry: &Value) -> Result<(), Error> {
    if plugin_type(entry) == Some(PLUGIN_TYPE) && entry.is_object() {
        Ok(())
    } else {
        Err(Error::Entry)
    }
}

fn check_version(net: &Network) -> Result<(), Error> {
    if SUPPORTED_VERSIONS.contains(&net.version()) {
        Ok(())
    } else {
        Err(Error::Version {
            path: net.path.display().to_string(),
            name: net.name().into(),
            version: net.version().into(),
        })
    }
}

/// `net` with our entry as its last plugin (an older entry of ours, wherever it was, replaced).
/// Every other field and plugin is kept as it was.
pub fn with_entry(net: &Network, entry: &Value) -> Result<Map<String, Value>, Error> {
    check_entry(entry)?;
    check_version(net)?;
    let mut list = net.list.clone();
    let mut plugins: Vec<Value> = net
        .plugins()
        .iter()
        .filter(|p| plugin_type(p) != Some(PLUGIN_TYPE))
        .cloned()
        .collect();
    plugins.push(entry.clone());
    list.insert("plugins".into(), Value::Array(plugins));
    Ok(list)
}

/// `net` without our entry; `None` when nothing of ours was in it.
pub fn without_entry(net: &Network) -> Option<Map<String, Value>> {
    net.entry()?;
    let mut list = net.list.clone();
    let plugins: Vec<Value> = net
        .plugins()
        .iter()
        .filter(|p| plugin_type(p) != Some(PLUGIN_TYPE))
        .cloned()
        .collect();
    list.insert("plugins".into(), Value::Array(plugins));
    Some(list)
}

/// The bytes written for a list: pretty JSON, newline-terminated, key order kept.
pub fn render(list: &Map<String, Value>) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(list).expect("a JSON map always serialises");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests;
