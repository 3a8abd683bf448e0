//! A `log` backend for a short-lived plugin: one line per record to an optional file and/or
//! stderr. Never stdout: that is the CNI result channel.
//!
//! The plugin runs as root, and its `logFile` comes from a conflist: the file is opened
//! without following a symbolic link and used only if it is a regular file owned by root
//! and writable by nobody else, so that the log cannot be turned into a root write to
//! another file. Every record is one line: newlines and control characters in a message
//! (some carry the agent's words) are escaped, so no line can be forged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
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
            one_line(&r.args().to_string())
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

/// Opens `path` for appending (created mode 0640 if absent), refusing a symbolic link, anything
/// but a regular file, a file not owned by root (uid 0), and a file group or others may write.
pub fn open_log(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == nix::errno::Errno::ELOOP as i32 => {
                format!("{} is a symbolic link", path.display())
            }
            _ => format!("{}: {e}", path.display()),
        })?;
    let m = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !m.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if m.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, not root",
            path.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o})",
            path.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(f)
}

/// `text` on one line: newlines, other control characters and backslashes escaped.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Installs the logger once per process (later calls are ignored). A `logFile` that cannot be
/// used safely is not used; the reason goes to stderr (never stdout).
pub fn init(conf: &NetConf) {
    let level = conf.log_level.parse().unwrap_or(LevelFilter::Warn);
    let file = conf.log_file.as_ref().and_then(|p| match open_log(p) {
        Ok(f) => Some(Mutex::new(f)),
        Err(why) => {
            let _ = writeln!(
                std::io::stderr(),
                "ambit-cni: warning: logFile not used: {}",
                one_line(&why)
            );
            None
        }
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_log_file_is_never_a_link_a_foreign_file_or_writable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("cni.log");
        let f = open_log(&log).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o640);
        drop(f);

        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = open_log(&link).unwrap_err();
        assert!(e.contains("is a symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");

        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = open_log(&log).unwrap_err();
        assert!(e.contains("writable by group or others (mode 666)"), "{e}");

        let e = open_log(dir.path()).unwrap_err();
        assert!(!e.is_empty());
    }

    #[test]
    fn a_message_stays_on_one_line() {
        assert_eq!(
            one_line("agent said: ok\n1700000000.000 ambit-cni[1] INFO forged\r\u{1b}[31m\\"),
            "agent said: ok\\n1700000000.000 ambit-cni[1] INFO forged\\r\\u{1b}[31m\\\\"
        );
    }
}
