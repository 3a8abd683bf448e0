//! Tier "podman": podman 4.3 on its CNI backend, placed on a test node with `nsenter --net`.
//! Two containers talk over the node's bridge, through the agent.

use std::process::Command;
use std::time::Duration;

use ambit_tests::*;

struct Podman {
    root: std::path::PathBuf,
    node_ns: std::path::PathBuf,
    conf: std::path::PathBuf,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.node_ns.display()))
            .arg("podman")
            .arg("--root")
            .arg(self.root.join("root"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(args)
            .env("CONTAINERS_CONF", &self.conf);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.cmd(args)).unwrap()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-a", "-f", "-t", "0"]).output();
    }
}

#[test]
fn two_podman_containers_talk_through_the_agent() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let pm_dir = node.dir.0.join("podman");
    std::fs::create_dir_all(&pm_dir).unwrap();
    let conf = pm_dir.join("containers.conf");
    std::fs::write(
        &conf,
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/usr/lib/cni\", \"{}\"]\nnetwork_config_dir = \"{}\"\n\n\
             [containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=4096:4096\"]\n\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
            node.dir.0.join("bin").display(),
            node.dir.0.join("net.d").display()
        ),
    )
    .unwrap();
    let pm = Podman {
        root: pm_dir.clone(),
        node_ns: node.ns.path(),
        conf,
    };
    let tar = busybox_rootfs_tar(
        &pm_dir,
        "web",
        &["sh", "httpd", "wget"],
        &[("www/index.html", "hello-through-ambit\n")],
    );
    pm.ok(&[
        "import",
        "--change",
        "CMD [\"/bin/sh\"]",
        "--change",
        "ENV PATH=/bin",
        tar.to_str().unwrap(),
        "localhost/ambit-busybox:test",
    ]);
    assert_eq!(
        pm.ok(&["info", "--format", "{{.Host.NetworkBackend}}"])
            .trim(),
        "cni"
    );

    let srv = unique("srv");
    pm.ok(&[
        "run",
        "-d",
        "--name",
        &srv,
        "--network",
        &node.net,
        "localhost/ambit-busybox:test",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let ip = pm
        .ok(&[
            "inspect",
            "-f",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                node.net
            ),
            &srv,
        ])
        .trim()
        .to_string();
    assert!(!ip.is_empty(), "no IP for the server container");
    assert_eq!(
        node.recorded_pods().len(),
        1,
        "the server container was not captured"
    );

    let url = format!("http://{ip}:8080/index.html");
    let mut body = String::new();
    let got = wait_for(Duration::from_secs(10), || {
        let out = pm
            .cmd(&[
                "run",
                "--rm",
                "--network",
                &node.net,
                "localhost/ambit-busybox:test",
                "wget",
                "-q",
                "-O-",
                &url,
            ])
            .output()
            .unwrap();
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    assert!(
        got.is_ok(),
        "client container could not fetch {url}: {body}\nagent:\n{}",
        node.agent_log()
    );
    assert_eq!(body, "hello-through-ambit\n");
    let dst: std::net::SocketAddr = format!("{ip}:8080").parse().unwrap();
    let log = node.agent_log();
    assert!(
        access_lines(&log, "outbound", dst) >= 1,
        "not seen outbound:\n{log}"
    );
    assert!(
        access_lines(&log, "inbound", dst) >= 1,
        "not seen inbound:\n{log}"
    );
    // The client container's DEL (on exit) released it: only the server is still captured.
    wait_for(Duration::from_secs(5), || node.recorded_pods().len() == 1).unwrap();
}
