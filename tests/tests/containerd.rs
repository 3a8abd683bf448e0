//! Tier "containerd": a private containerd 1.6 driven through CRI v1 exactly as kubelet does
//! (RunPodSandbox / StopPodSandbox / RemovePodSandbox), so the plugin sees kubelet's CNI_ARGS,
//! pod annotations in runtimeConfig, and the second DEL with an empty CNI_NETNS.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ambit_tests::*;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

struct Containerd {
    child: Child,
    sock: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image_tar(dir: &Path) -> PathBuf {
    let tar = busybox_rootfs_tar(dir, "pause", &["sh", "sleep"], &[]);
    // podman turns the rootfs into an image archive containerd can import (no registry here).
    let store = dir.join("pm");
    let pm = |args: &[&str]| {
        run_ok(
            Command::new("podman")
                .arg("--root")
                .arg(store.join("root"))
                .arg("--runroot")
                .arg(store.join("run"))
                .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
                .args(args),
        )
        .unwrap()
    };
    pm(&[
        "import",
        "--change",
        "CMD [\"/bin/sleep\", \"100000\"]",
        tar.to_str().unwrap(),
        "localhost/ambit-pause:test",
    ]);
    let archive = dir.join("pause-image.tar");
    pm(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        archive.to_str().unwrap(),
        "localhost/ambit-pause:test",
    ]);
    archive
}

/// The CNI bin dir containerd uses: Debian's plugins; `ambit-cni` too unless the installer is
/// to put it there.
fn cni_bin_dir(node: &Node, with_ambit: bool) -> PathBuf {
    let bin = node.dir.0.join("ctd/cni-bin");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&bin).unwrap();
    for e in std::fs::read_dir("/usr/lib/cni").unwrap().flatten() {
        std::os::unix::fs::symlink(e.path(), bin.join(e.file_name())).unwrap();
    }
    if with_ambit {
        std::os::unix::fs::symlink(&bins().cni, bin.join("ambit-cni")).unwrap();
    }
    bin
}

fn start_containerd(node: &Node) -> Containerd {
    let d = node.dir.0.join("ctd");
    let bin = cni_bin_dir(node, true);
    let sock = d.join("containerd.sock");
    let config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "localhost/ambit-pause:test"
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{bin}"
      conf_dir = "{confdir}"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
"#,
        d = d.display(),
        sock = sock.display(),
        bin = bin.display(),
        confdir = node.dir.0.join("net.d").display(),
    );
    std::fs::write(d.join("config.toml"), config).unwrap();
    let log = std::fs::File::create(d.join("containerd.log")).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path().display()))
        .arg("containerd")
        .arg("--config")
        .arg(d.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting containerd (apt-get install containerd)");
    wait_for(Duration::from_secs(20), || sock.exists()).expect("containerd did not start");
    let archive = image_tar(&d);
    run_ok(
        Command::new("ctr")
            .arg("-a")
            .arg(&sock)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive),
    )
    .unwrap();
    Containerd { child, sock }
}

async fn client(sock: PathBuf) -> RuntimeServiceClient<Channel> {
    let ch = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = sock.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(s).await?)) }
        }))
        .await
        .unwrap();
    RuntimeServiceClient::new(ch)
}

fn sandbox(name: &str, annotations: HashMap<String, String>) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: "shop".into(),
            uid: format!("uid-{name}"),
            attempt: 0,
        }),
        hostname: name.into(),
        annotations,
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

#[test]
fn containerd_cri_sandboxes_are_captured_and_released() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let ctd = start_containerd(&node);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = client(ctd.sock.clone()).await;
        let v = c
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.runtime_api_version, "v1");

        let captured = c
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox("cart-0", HashMap::new())),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncni log:\n{}", node.cni_log()))
            .into_inner()
            .pod_sandbox_id;
        let opted_out = c
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox(
                    "legacy-0",
                    [("ambit.dev/capture".to_string(), "disabled".to_string())].into(),
                )),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        // Only the first sandbox is captured: the annotation reached the plugin.
        assert_eq!(node.recorded_pods(), vec![captured.clone()]);
        let log = node.cni_log();
        assert!(
            log.contains(&format!("ADD shop/cart-0 ({captured}): captured")),
            "{log}"
        );

        let status = c
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: captured.clone(),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner();
        let ip: std::net::IpAddr = status.status.unwrap().network.unwrap().ip.parse().unwrap();
        // The sandbox's namespace holds the rules; find it through the agent's record.
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(node.state_dir().join(format!("pod-{captured}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["pod"]["uid"], "uid-cart-0");
        assert_eq!(rec["pod"]["ips"][0], ip.to_string());
        let netns = rec["pod"]["netns_path"].as_str().unwrap().to_string();
        let rules = run_ok(
            Command::new("nsenter")
                .arg(format!("--net={netns}"))
                .args(["nft", "list", "ruleset"]),
        )
        .unwrap();
        assert!(rules.contains("redirect to :15001"), "{rules}");

        for id in [&captured, &opted_out] {
            c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .unwrap();
            c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .unwrap();
        }
        assert!(node.recorded_pods().is_empty());
        // kubelet's pattern: DEL on stop with the netns, DEL again on remove with CNI_NETNS empty.
        let log = node.cni_log();
        let dels: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("DEL {captured}: CNI_NETNS=")))
            .collect();
        assert!(
            dels.len() >= 2,
            "expected DEL on stop and on remove:\n{log}"
        );
        assert!(
            dels.iter().any(|l| l.ends_with("CNI_NETNS=\"\"")),
            "no DEL with an empty CNI_NETNS:\n{log}"
        );
    });
}

/// The install flow on a node: the primary network's conflist has no ambit-cni; `ambit-install`
/// copies the plugin into containerd's CNI bin dir and chains it; containerd's CRI then captures
/// a sandbox through the file the installer wrote.
#[test]
fn containerd_captures_through_the_conflist_ambit_install_wrote() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let conflist = node.dir.0.join("net.d/10-ambit-test.conflist");
    let mut primary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    let ours = primary["plugins"].as_array_mut().unwrap().pop().unwrap();
    assert_eq!(ours["type"], "ambit-cni");
    std::fs::write(&conflist, serde_json::to_vec_pretty(&primary).unwrap()).unwrap();
    let bin = cni_bin_dir(&node, false);
    let mut settings = ours.clone();
    settings.as_object_mut().unwrap().remove("type");
    let out = run_ok(
        Command::new(&bins().install)
            .arg("--cni-conf-dir")
            .arg(node.dir.0.join("net.d"))
            .arg("--cni-bin-dir")
            .arg(&bin)
            .arg("--plugin-binary")
            .arg(&bins().cni)
            .arg("--plugin-config")
            .arg(settings.to_string())
            .arg("install"),
    )
    .unwrap();
    assert!(out.trim().ends_with("10-ambit-test.conflist"), "{out}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(written["plugins"][1]["type"], "ambit-cni");
    assert_eq!(written["plugins"][0], primary["plugins"][0]);
    assert!(
        !bin.join("ambit-cni").is_symlink(),
        "the installer copied the binary"
    );

    let ctd = start_containerd(&node);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = client(ctd.sock.clone()).await;
        let id = c
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox("installed-0", HashMap::new())),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncni log:\n{}", node.cni_log()))
            .into_inner()
            .pod_sandbox_id;
        assert_eq!(node.recorded_pods(), vec![id.clone()]);
        assert!(
            node.cni_log()
                .contains(&format!("ADD shop/installed-0 ({id}): captured")),
            "{}",
            node.cni_log()
        );
        c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .unwrap();
        assert!(node.recorded_pods().is_empty());
    });
}
