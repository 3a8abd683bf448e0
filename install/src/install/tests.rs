//! Golden files: each `testdata/<case>/in` directory is installed into (chained unless the
//! case is `own-file`), and the resulting directory must equal `testdata/<case>/out` byte for
//! byte. `AMBIT_BLESS=1 cargo test -p ambit-install` rewrites the `out` directories (review the
//! diff before committing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn entry() -> Value {
    serde_json::json!({"type": "ambit-cni", "name": "ambit-cni", "agentSocket": "/var/run/ambit/cni.sock"})
}

fn read_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

struct Node {
    _tmp: tempfile::TempDir,
    settings: Settings,
}

fn node(case: &str, mode: Mode) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("net.d");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    for (name, bytes) in read_dir(&testdata().join(case).join("in")) {
        std::fs::write(conf.join(name), bytes).unwrap();
    }
    let plugin = tmp.path().join("ambit-cni-build");
    std::fs::write(&plugin, b"\x7fELF test plugin").unwrap();
    Node {
        settings: Settings {
            conf_dir: conf,
            bin_dir: bin,
            plugin_binary: plugin,
            entry: entry(),
            mode,
        },
        _tmp: tmp,
    }
}

fn golden(case: &str, mode: Mode) -> Node {
    let n = node(case, mode);
    let first = install_config(&n.settings).unwrap();
    assert!(matches!(first, Outcome::Wrote(_)), "{case}: {first:?}");
    let got = read_dir(&n.settings.conf_dir);
    let out = testdata().join(case).join("out");
    if std::env::var_os("AMBIT_BLESS").is_some() {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        for (name, bytes) in &got {
            std::fs::write(out.join(name), bytes).unwrap();
        }
    }
    let want = read_dir(&out);
    for (name, bytes) in &want {
        assert_eq!(
            got.get(name)
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            Some(String::from_utf8_lossy(bytes).into_owned()),
            "{case}: {name}"
        );
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{case}: the files in the directory"
    );
    // No write loop: a second pass over its own result writes nothing.
    let second = install_config(&n.settings).unwrap();
    assert!(
        matches!(second, Outcome::Unchanged(_)),
        "{case}: {second:?}"
    );
    assert_eq!(read_dir(&n.settings.conf_dir), got);
    n
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// After uninstall every list holds exactly the primary's plugins again, fields intact.
fn uninstalls_cleanly(n: &Node, case: &str) {
    install_binary(&n.settings).unwrap();
    assert!(
        check(&n.settings).is_ok(),
        "{case}: {:?}",
        check(&n.settings)
    );
    let done = uninstall(&n.settings).unwrap();
    assert!(!done.is_empty());
    assert!(!n.settings.binary_path().exists());
    assert!(check(&n.settings).is_err());
    let input = testdata().join(case).join("in");
    for (name, _) in read_dir(&input) {
        let before = input.join(&name);
        let after = n.settings.conf_dir.join(&name);
        if name.ends_with(".conflist") && after.exists() {
            let mut want = json(&before);
            if let Some(p) = want.get_mut("plugins").and_then(Value::as_array_mut) {
                p.retain(|p| p["type"] != "ambit-cni");
            }
            assert_eq!(json(&after), want, "{case}: {name}");
        }
    }
}

#[test]
fn golden_bridge_conflist() {
    let n = golden("bridge-conflist", Mode::Chained);
    uninstalls_cleanly(&n, "bridge-conflist");
}

#[test]
fn golden_bridge_conf_is_wrapped_into_a_conflist() {
    let n = golden("bridge-conf", Mode::Chained);
    let list = n.settings.conf_dir.join("10-bridge.conflist");
    assert!(!n.settings.conf_dir.join("10-bridge.conf").exists());
    // The wrapped plugin keeps every field, and the list takes its name and version.
    let v = json(&list);
    assert_eq!(v["name"], "bridge");
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["plugins"][0]["bridge"], "cnio0");
    uninstalls_cleanly(&n, "bridge-conf");
}

#[test]
fn a_wrapped_conf_keeps_its_file_mode() {
    let n = node("bridge-conf", Mode::Chained);
    let conf = n.settings.conf_dir.join("10-bridge.conf");
    std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    install_config(&n.settings).unwrap();
    assert_eq!(
        files::mode_of(&n.settings.conf_dir.join("10-bridge.conflist")),
        Some(0o600)
    );
}

#[test]
fn golden_calico() {
    let n = golden("calico", Mode::Chained);
    uninstalls_cleanly(&n, "calico");
}

#[test]
fn golden_cilium() {
    let n = golden("cilium", Mode::Chained);
    uninstalls_cleanly(&n, "cilium");
}

#[test]
fn golden_flannel() {
    let n = golden("flannel", Mode::Chained);
    uninstalls_cleanly(&n, "flannel");
}

#[test]
fn golden_kindnet() {
    let n = golden("kindnet", Mode::Chained);
    uninstalls_cleanly(&n, "kindnet");
}

#[test]
fn golden_already_present_entry_is_replaced_and_moved_last() {
    let n = golden("already-present", Mode::Chained);
    let v = json(&n.settings.conf_dir.join("10-calico.conflist"));
    let types: Vec<_> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["calico", "portmap", "ambit-cni"]);
    assert_eq!(v["plugins"][2]["agentSocket"], "/var/run/ambit/cni.sock");
    uninstalls_cleanly(&n, "already-present");
}

#[test]
fn golden_malformed_files_before_the_primary_are_skipped() {
    let n = golden("malformed-first", Mode::Chained);
    let scan = cniconf::scan(&n.settings.conf_dir, None).unwrap();
    assert_eq!(scan.invalid_before.len(), 2, "{:?}", scan.invalid_before);
    assert!(scan.primary.unwrap().path.ends_with("10-flannel.conflist"));
}

#[test]
fn golden_own_file_leaves_the_primary_untouched() {
    let mode = Mode::OwnFile("00-ambit.conflist".into());
    let n = golden("own-file", mode.clone());
    assert_eq!(
        std::fs::read(n.settings.conf_dir.join("05-cilium.conflist")).unwrap(),
        std::fs::read(testdata().join("own-file/in/05-cilium.conflist")).unwrap()
    );
    let own = json(&n.settings.conf_dir.join("00-ambit.conflist"));
    assert_eq!(own["name"], "cilium", "same network name: same IPAM state");
    // The primary rewrites its file: our copy follows.
    let cilium = n.settings.conf_dir.join("05-cilium.conflist");
    let mut v = json(&cilium);
    v["plugins"][0]["enable-debug"] = true.into();
    std::fs::write(&cilium, serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(matches!(
        install_config(&n.settings).unwrap(),
        Outcome::Wrote(_)
    ));
    assert_eq!(
        json(&n.settings.conf_dir.join("00-ambit.conflist"))["plugins"][0]["enable-debug"],
        true
    );
    install_binary(&n.settings).unwrap();
    assert!(check(&n.settings).is_ok());
    uninstall(&n.settings).unwrap();
    assert!(!n.settings.conf_dir.join("00-ambit.conflist").exists());
    assert_eq!(json(&cilium), v);
}

#[test]
fn an_own_file_that_would_not_win_is_refused() {
    let n = node("cilium", Mode::OwnFile("50-ambit.conflist".into()));
    let err = install_config(&n.settings).unwrap_err();
    assert!(matches!(err, Error::OwnFileLoses { .. }), "{err}");
    assert!(err.to_string().contains("05-cilium.conflist"), "{err}");
}

#[test]
fn no_primary_means_wait_and_an_old_version_is_refused() {
    let n = node("cilium", Mode::Chained);
    let f = n.settings.conf_dir.join("05-cilium.conflist");
    std::fs::remove_file(&f).unwrap();
    assert_eq!(install_config(&n.settings).unwrap(), Outcome::NoPrimary);
    std::fs::write(
        &f,
        r#"{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"x"}]}"#,
    )
    .unwrap();
    let err = install_config(&n.settings).unwrap_err();
    assert!(err.to_string().contains("0.2.0"), "{err}");
    assert!(check(&n.settings).is_err());
}

#[test]
fn the_primary_dropping_our_entry_is_repaired_once() {
    let n = node("flannel", Mode::Chained);
    install_config(&n.settings).unwrap();
    let f = n.settings.conf_dir.join("10-flannel.conflist");
    // Flannel's init container rewrites its file on restart.
    std::fs::copy(testdata().join("flannel/in/10-flannel.conflist"), &f).unwrap();
    assert!(matches!(
        install_config(&n.settings).unwrap(),
        Outcome::Wrote(_)
    ));
    assert!(matches!(
        install_config(&n.settings).unwrap(),
        Outcome::Unchanged(_)
    ));
    assert!(json(&f)["plugins"][2]["type"] == "ambit-cni");
}

#[test]
fn a_foreign_conflist_beside_a_wrapped_conf_is_not_overwritten() {
    let n = node("bridge-conf", Mode::Chained);
    let list = n.settings.conf_dir.join("10-bridge.conflist");
    std::fs::write(
        &list,
        r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"x"}]}"#,
    )
    .unwrap();
    let err = install_config(&n.settings).unwrap_err();
    assert!(matches!(err, Error::Foreign(_)), "{err}");
    assert!(json(&list)["name"] == "other");
}
