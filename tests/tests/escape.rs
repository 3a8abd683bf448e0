//! Tier "escape": a process inside a captured pod, or someone with CAP_NET_ADMIN in it, tries to
//! get its traffic around the capture. Each attempt is either captured anyway or found by the
//! agent's verification within one period.

use std::net::SocketAddr;
use std::time::Duration;

use ambit_common::nft::{self, Batch, Expr, NftSocket};
use ambit_common::redirect::{self, RuleSet};
use ambit_tests::mesh::*;
use ambit_tests::*;
use anyhow::Result;

const TD: &str = "cluster.local";

/// Sends `marker` to `dst` from inside `pod` as a process that holds CAP_NET_RAW but neither
/// CAP_NET_ADMIN nor CAP_SYS_ADMIN (a container's default set), on a socket carrying SO_MARK
/// `mark`; prints what the process saw.
fn marked_client(pod: &Pod, dst: SocketAddr, mark: u32, marker: &str) -> Result<String> {
    let script = format!(
        r#"
import socket
caps = int([l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1], 16)
assert not caps & (1 << 12), "CAP_NET_ADMIN must be dropped"
assert not caps & (1 << 21), "CAP_SYS_ADMIN must be dropped"
assert caps & (1 << 13), "CAP_NET_RAW must be kept"
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, 36, {mark})  # SO_MARK: allowed with CAP_NET_RAW (Linux 5.17+)
print("mark", s.getsockopt(socket.SOL_SOCKET, 36))
s.settimeout(10)
s.connect(("{ip}", {port}))
s.sendall(b"{marker}")
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print("reply", data.decode())
"#,
        ip = dst.ip(),
        port = dst.port(),
    );
    pod.ns.exec(&[
        "setpriv",
        "--bounding-set=-net_admin,-sys_admin",
        "--inh-caps=-net_admin,-sys_admin",
        "python3",
        "-c",
        &script,
    ])
}

#[test]
fn a_socket_mark_does_not_let_a_pod_process_skip_capture() {
    let _alone = capture_alone();
    let ca = TestCa::new("escape");
    let shared = TempDir::new("escape");
    let manifests = shared.0.join("manifests");
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = mesh_args(&ca, &shared.0, TD);
    // What crosses the wire is the proof here: same-node HBONE stays on it.
    node.agent_args.extend(shortcut_args(false));
    node.start_agent().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    write_pod_manifest(&manifests, &a, "a", true);
    write_pod_manifest(&manifests, &b, "b", true);
    wait_for(Duration::from_secs(10), || manifest_loads(&node) >= 1).unwrap();
    echo_named(&b.ns.open(), 7300, "b");
    let dst = SocketAddr::new(b.ip, 7300);
    let cap = Capture::start(&node.ns.name, &shared.0).unwrap();
    let marker = format!("AMBIT-MARKER-{}", unique("mark"));
    // The mark an earlier agent exempted, then others: none is an exemption.
    for mark in [0x539u32, 0x222, 0x7fff_ffff] {
        let out = marked_client(&a, dst, mark, &marker).unwrap();
        assert!(
            out.contains(&format!("mark {mark}"))
                && out.contains(&format!("reply b;peer={};{marker}", a.ip)),
            "mark {mark:#x}: {out}"
        );
    }
    // The reply-routing mark sends the socket's own packets to the local table: its connect
    // fails before anything leaves the pod.
    let err = marked_client(&a, dst, 0x111, &marker)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mark 273") && err.contains("Network is unreachable"),
        "{err}"
    );
    let tls = assert_only_tls(
        "node (bridge, veths)",
        &cap.finish().unwrap(),
        marker.as_bytes(),
    );
    assert!(tls > 0, "the connections did not cross the bridge as TLS");
    // Each was taken by A's outbound listener and carried over HBONE.
    let log = node.agent_log();
    let hbone = log
        .lines()
        .filter(|l| l.contains("connection complete") && l.contains("protocol=\"hbone\""))
        .filter(|l| l.contains("direction=\"outbound\"") && l.contains(&format!("dst.addr={dst} ")))
        .count();
    assert_eq!(hbone, 3, "three captured connections:\n{log}");
}

/// The redirect table as installed, with `edit` applied to its rules (tags kept).
fn install_altered(sock: &NftSocket, edit: impl FnOnce(&mut Vec<nft::Rule>)) {
    let mut rules = RuleSet::default().rules();
    edit(&mut rules);
    let mut b = Batch::new();
    b.ensure_table(nft::NFPROTO_INET, redirect::TABLE);
    b.delete_table(nft::NFPROTO_INET, redirect::TABLE);
    b.ensure_table(nft::NFPROTO_INET, redirect::TABLE);
    for c in redirect::chains() {
        b.add_chain(nft::NFPROTO_INET, redirect::TABLE, &c);
    }
    for r in &rules {
        b.add_rule(nft::NFPROTO_INET, redirect::TABLE, r);
    }
    sock.apply(b).unwrap();
}

fn in_pod_nft(pod: &Pod) -> NftSocket {
    pod.ns.open().run(NftSocket::open).unwrap().unwrap()
}

#[test]
fn a_redirect_rewritten_in_place_with_its_tag_kept_is_found_and_repaired() {
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = vec!["--verify-seconds".into(), "0.2".into()];
    node.start_agent().unwrap();
    let a = node.add_pod("a").unwrap();
    let sock = in_pod_nft(&a);
    // The 15001 redirect becomes `accept`; chain, position and user-data tag stay.
    install_altered(&sock, |rules| {
        let last = rules.last_mut().unwrap();
        assert!(last.exprs.contains(&Expr::Redir {
            port_reg: nft::REG_1
        }));
        last.exprs = vec![Expr::Verdict(nft::NF_ACCEPT)];
    });
    let redirected = || {
        sock.dump_rules(nft::NFPROTO_INET, redirect::TABLE)
            .unwrap()
            .unwrap_or_default()
            .last()
            .is_some_and(|r| {
                r.exprs.contains(&Expr::Redir {
                    port_reg: nft::REG_1,
                })
            })
    };
    assert!(!redirected(), "the altered rule is in place");
    // The log line follows the repair (it is written after the new table is in place).
    wait_for(Duration::from_secs(10), || {
        redirected()
            && node
                .agent_log()
                .contains("were missing or altered: reinstalled")
    })
    .unwrap_or_else(|_| panic!("the rewritten rule was not repaired:\n{}", node.agent_log()));
    // The agent's own exemption table is verified the same way.
    let tables = a.ns.exec(&["nft", "list", "tables"]).unwrap();
    let own = tables
        .lines()
        .find_map(|l| l.strip_prefix("table inet ambit-agent-"))
        .unwrap_or_else(|| panic!("no exemption table: {tables}"))
        .to_string();
    a.ns.exec(&[
        "nft",
        "flush",
        "chain",
        "inet",
        &format!("ambit-agent-{own}"),
        "output",
    ])
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        a.ns.exec(&[
            "nft",
            "list",
            "table",
            "inet",
            &format!("ambit-agent-{own}"),
        ])
        .is_ok_and(|t| t.contains("socket cgroupv2"))
    })
    .unwrap_or_else(|_| {
        panic!(
            "the flushed exemption was not repaired:\n{}",
            node.agent_log()
        )
    });
}

#[test]
fn a_foreign_chain_ahead_of_the_capture_makes_the_pod_unprotected() {
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = vec!["--verify-seconds".into(), "0.2".into()];
    node.start_agent().unwrap();
    let a = node.add_pod("a").unwrap();
    wait_for(Duration::from_secs(10), || node.readiness().0 == 200).unwrap();
    // `notrack` before conntrack: no connection, so no redirect, for anything it matches.
    for cmd in [
        "add table ip sneaky",
        "add chain ip sneaky raw { type filter hook output priority -300; }",
        "add rule ip sneaky raw tcp dport 7400 notrack",
    ] {
        let args: Vec<&str> = std::iter::once("nft").chain(cmd.split(' ')).collect();
        a.ns.exec(&args).unwrap();
    }
    wait_for(Duration::from_secs(10), || {
        node.agent_log().contains("UNPROTECTED") && node.readiness().0 == 503
    })
    .unwrap_or_else(|_| panic!("the foreign chain went unnoticed:\n{}", node.agent_log()));
    let log = node.agent_log();
    assert!(
        log.contains("table ip sneaky chain raw (type filter hook output priority -300)"),
        "{log}"
    );
    let text = node.scrape("/metrics", 15020);
    assert_eq!(
        metric(&text, "ambit_pods_unprotected", &[]),
        Some(1.0),
        "{text}"
    );
    // Gone again: the pod is protected again.
    a.ns.exec(&["nft", "delete", "table", "ip", "sneaky"])
        .unwrap();
    wait_for(Duration::from_secs(10), || node.readiness().0 == 200)
        .unwrap_or_else(|_| panic!("still not ready:\n{}", node.agent_log()));
}
