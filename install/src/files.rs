//! File operations a runtime may observe mid-way: every write goes to a temporary file in the
//! same directory (a name no runtime loads), is flushed, then renamed over the target, so a
//! reader sees the old file or the new one — never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Suffix of temporary files: not `.conf`, `.conflist` or `.json`, so libcni never loads one.
pub const TMP_SUFFIX: &str = ".ambit-tmp";

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "ambit".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}{TMP_SUFFIX}"))
}

/// Writes `bytes` to `path` atomically with permission bits `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed the mode given to open.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The permission bits of `path`, if it exists.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Copies `src` to `dst` atomically (mode 0755) unless `dst` already has the same bytes.
/// Returns whether it wrote.
pub fn install_binary(src: &Path, dst: &Path) -> io::Result<bool> {
    let new = fs::read(src)?;
    if fs::read(dst).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    write_atomic(dst, &new, 0o755)?;
    Ok(true)
}

/// Removes a file; a file already gone is fine. Returns whether it removed one.
pub fn remove(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_keep_the_mode_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("10-x.conflist");
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(mode_of(&p), Some(0o600));
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), Some(0o644));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["10-x.conflist"]);
    }

    #[test]
    fn binaries_are_copied_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("ambit-cni");
        fs::write(&src, b"\x7fELF v1").unwrap();
        assert!(install_binary(&src, &dst).unwrap());
        assert_eq!(mode_of(&dst), Some(0o755));
        assert!(!install_binary(&src, &dst).unwrap(), "same bytes: no write");
        fs::write(&src, b"\x7fELF v2").unwrap();
        assert!(install_binary(&src, &dst).unwrap());
        assert_eq!(fs::read(&dst).unwrap(), b"\x7fELF v2");
        assert!(remove(&dst).unwrap());
        assert!(!remove(&dst).unwrap());
    }
}
