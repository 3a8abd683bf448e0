//! A `log` backend for a short-lived plugin: one line per record to an optional file and/or
//! stderr. Never stdout: that is the CNI result channel.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::NetConf;

struct Logger {
    level: LevelFilter,
    file: Option<Mutex<File>>,
    stderr: bool,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "{}.{:03} ambit-cni[{}] {} {}\n",
            ts.as_secs(),
            ts.subsec_millis(),
            std::process::id(),
            r.level(),
            r.args()
        );
        if let Some(f) = &self.file
            && let Ok(mut f) = f.lock()
        {
            let _ = f.write_all(line.as_bytes());
        }
        if self.stderr {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once per process (later calls are ignored).
pub fn init(conf: &NetConf) {
    let level = conf.log_level.parse().unwrap_or(LevelFilter::Warn);
    let file = conf.log_file.as_ref().and_then(|p| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(Mutex::new)
            .ok()
    });
    let stderr = conf.log_stderr.unwrap_or(true);
    let logger = Logger {
        level,
        file,
        stderr,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
