//! `ambit-install run`, the DaemonSet's installer container, as a process: it chains the
//! plugin, puts it back when the primary CNI rewrites its file (once per rewrite: no write
//! loop), backs off from a primary that fights, and on SIGTERM with `--on-exit uninstall`
//! removes everything it added. Files only: no privileges needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ambit_tests::*;

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

struct Installer {
    child: Child,
    log: PathBuf,
}

impl Installer {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Installer {
    let log = dir.join("install.log");
    let child = Command::new(&bins().install)
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        .arg("--plugin-binary")
        .arg(&bins().cni)
        .args([
            "--plugin-config",
            r#"{"agentSocket":"/var/run/ambit/cni.sock"}"#,
        ])
        .args(["run", "--on-exit", "uninstall", "--resync-seconds", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Installer { child, log }
}

fn plugin_types(path: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    v["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str().map(String::from))
        .collect()
}

const CHAINED: &str = "ambit-cni chained into the pod network";

#[test]
fn the_installer_waits_for_the_primary_repairs_rewrites_once_and_uninstalls_on_sigterm() {
    let dir = TempDir::new("install");
    std::fs::create_dir_all(dir.0.join("net.d")).unwrap();
    std::fs::create_dir_all(dir.0.join("bin")).unwrap();
    let inst = start(&dir.0);
    // No primary yet: it waits, and says so.
    wait_for(Duration::from_secs(20), || {
        inst.log().contains("no pod network configuration yet")
    })
    .unwrap_or_else(|_| panic!("{}", inst.log()));
    assert!(
        dir.0.join("bin/ambit-cni").exists(),
        "the binary goes in first"
    );
    let flannel = dir.0.join("net.d/10-flannel.conflist");
    std::fs::write(&flannel, FLANNEL).unwrap();
    let want = ["flannel", "portmap", "ambit-cni"];
    wait_for(Duration::from_secs(10), || plugin_types(&flannel) == want)
        .unwrap_or_else(|_| panic!("not chained: {}", inst.log()));

    // Flannel's init container rewrites its file: the entry comes back, with one write.
    std::fs::write(&flannel, FLANNEL).unwrap();
    wait_for(Duration::from_secs(10), || inst.count(CHAINED) == 2)
        .unwrap_or_else(|_| panic!("not repaired: {}", inst.log()));
    assert_eq!(plugin_types(&flannel), want);

    // The binary removed behind its back is put back.
    std::fs::remove_file(dir.0.join("bin/ambit-cni")).unwrap();
    wait_for(Duration::from_secs(10), || {
        dir.0.join("bin/ambit-cni").exists()
    })
    .unwrap_or_else(|_| panic!("binary not restored: {}", inst.log()));
    // Its own writes do not wake it into more writes: it has handled a later change (the
    // binary) since its last chaining, and chained nothing more.
    assert_eq!(inst.count(CHAINED), 2, "{}", inst.log());

    // A primary that fights (rewrites whenever the file changes): the installer backs off and
    // says what to do.
    for _ in 0..8 {
        if inst.log().contains("keeps rewriting") {
            break;
        }
        wait_for(Duration::from_secs(20), || plugin_types(&flannel) == want)
            .unwrap_or_else(|_| panic!("{}", inst.log()));
        std::fs::write(&flannel, FLANNEL).unwrap();
    }
    assert!(
        inst.log().contains("--mode own-file"),
        "no back-off warning: {}",
        inst.log()
    );

    let mut inst = inst;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(inst.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = inst.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", inst.log());
    assert_eq!(plugin_types(&flannel), ["flannel", "portmap"]);
    assert!(!dir.0.join("bin/ambit-cni").exists());
    let left: Vec<_> = std::fs::read_dir(dir.0.join("net.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["10-flannel.conflist"], "no temporary files left");
}

#[test]
fn check_and_install_report_through_exit_codes() {
    let dir = TempDir::new("install-check");
    std::fs::create_dir_all(dir.0.join("net.d")).unwrap();
    std::fs::create_dir_all(dir.0.join("bin")).unwrap();
    let cmd = |sub: &str| {
        Command::new(&bins().install)
            .arg("--cni-conf-dir")
            .arg(dir.0.join("net.d"))
            .arg("--cni-bin-dir")
            .arg(dir.0.join("bin"))
            .arg("--plugin-binary")
            .arg(&bins().cni)
            .arg(sub)
            .output()
            .unwrap()
    };
    let out = cmd("install");
    assert_eq!(out.status.code(), Some(3), "no primary yet");
    let out = cmd("check");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no pod network configuration"));
    std::fs::write(dir.0.join("net.d/10-flannel.conflist"), FLANNEL).unwrap();
    assert!(cmd("install").status.success());
    let out = cmd("check");
    assert!(out.status.success(), "{out:?}");
    assert!(cmd("uninstall").status.success());
    assert_eq!(cmd("check").status.code(), Some(1));
    let bad = Command::new(&bins().install)
        .args(["--plugin-config", r#"{"type":"bridge"}"#, "check"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("\"type\""),
        "{bad:?}"
    );
}
