//! The cross-node figures (issue 20's topology): client pod on one node, server pod on
//! another, the nodes joined by a veth wire; client → agent A (15001) → HBONE → agent B
//! (15008) → server. Each agent does one half of every connection, as for most production
//! traffic; the agents' CPU, context switches and RSS are the two summed.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use ambit_tests::mesh::{TestCa, link_nodes, mesh_args, wait_manifest_pods, write_pod_manifest};
use ambit_tests::{Node, TempDir};

use crate::{
    Args, PRODUCTION_ARGS, alternated, baseline_table, path_table, pin_process, print_log_tail,
    runs, uncapture,
};

/// What every figure of this topology is called after.
const SCOPE: &str = "across nodes: ";

/// The figures through both agents (and through the baseline's pair, alternated, with
/// `--baseline-agent`), then direct between the same pods (agents stopped, capture removed),
/// per variant. The Markdown report and its JSON (`figures`, and `baseline` with a baseline).
pub fn figures(args: &Args, variants: &[bool]) -> Result<(String, Value)> {
    // One CA and one manifests directory for both agents, as one cluster's.
    let ca = TestCa::new("bench");
    let shared = TempDir::new("bench-cross");
    let mut client_node = Node::new("1.0.0")?;
    let mut server_node = Node::new("1.0.0")?;
    link_nodes(&client_node, &server_node)?;
    for node in [&mut client_node, &mut server_node] {
        node.agent_args = PRODUCTION_ARGS
            .into_iter()
            .map(String::from)
            .chain(mesh_args(&ca, &shared.0, "cluster.local"))
            .chain(args.agent_args.iter().cloned())
            .collect();
        node.start_agent()?;
    }
    let a = client_node.add_pod("bench-client")?;
    let b = server_node.add_pod("bench-server")?;
    let manifests = shared.0.join("manifests");
    write_pod_manifest(&manifests, &a, "bench-client", true);
    write_pod_manifest(&manifests, &b, "bench-server", true);
    wait_manifest_pods(&client_node, 2);
    wait_manifest_pods(&server_node, 2);
    let (client, server) = (a.ns.open(), b.ns.open());
    eprintln!("across nodes: client {} -> server {}", a.ip, b.ip);

    let (ambit, baseline) = match &args.baseline_agent {
        Some(bin) => {
            eprintln!("across nodes, through Ambit and through the baseline agents, alternated...");
            let nodes = &mut [&mut client_node, &mut server_node];
            let (this, base) = alternated(args, nodes, bin, variants, (&client, &server), b.ip)?;
            (this, Some(base))
        }
        None => {
            let mut ambit = Vec::new();
            for &pinned in variants {
                let tag = crate::pinned_tag(pinned);
                eprintln!("across nodes, through Ambit{tag}...");
                let mut pids = Vec::new();
                for node in [&client_node, &server_node] {
                    let pid = node.agent_pid().context("agent pid")?;
                    pin_process(pid, pinned)?;
                    pids.push(pid);
                }
                let r = runs(args, &client, &server, b.ip, &pids, pinned);
                ambit.push(r.inspect_err(|_| {
                    print_log_tail("client node's agent", &client_node.agent_log());
                    print_log_tail("server node's agent", &server_node.agent_log());
                })?);
            }
            (ambit, None)
        }
    };
    for (node, side) in [(&client_node, "client"), (&server_node, "server")] {
        anyhow::ensure!(
            node.agent_log().contains("protocol=\"hbone\""),
            "across nodes: the {side} node's agent relayed no HBONE: the traffic did not go \
             through both agents"
        );
    }

    client_node.kill_agent();
    server_node.kill_agent();
    uncapture(&[&a, &b])?;
    let mut direct = Vec::new();
    for &pinned in variants {
        let tag = crate::pinned_tag(pinned);
        eprintln!("across nodes, direct (capture rules removed){tag}...");
        direct.push(runs(args, &client, &server, b.ip, &[], pinned)?);
    }

    let mut md = String::from(
        "\nAcross two nodes: client pod → agent A → HBONE over a veth wire → agent B → server \
         pod; the agent figures are both agents summed.\n\n",
    );
    let (table, rows) = path_table(args, SCOPE, variants, &direct, &ambit);
    md.push_str(&table);
    let mut out = json!({ "figures": rows });
    if let (Some(base), Some(bin)) = (&baseline, &args.baseline_agent) {
        let (table, rows) = baseline_table(args, SCOPE, bin, variants, &ambit, base, &direct);
        md.push_str(&table);
        out["baseline"] = json!(rows);
    }
    Ok((md, out))
}
