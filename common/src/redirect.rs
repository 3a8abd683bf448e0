//! Ambit's in-pod rules, as nftables tables each installed in a single transaction.
//!
//! The redirect table, installed by the plugin before the pod starts and identical for every
//! agent:
//! ```text
//! table inet ambit {
//!   chain output-mangle { type route hook output priority mangle
//!     ct mark == 0x111  meta mark set 0x111               # app replies -> local table (route.rs)
//!   }
//!   chain prerouting-nat { type nat hook prerouting priority dstnat
//!     ip saddr PROBE_V4 accept ; ip6 saddr PROBE_V6 accept  # kubelet probes
//!     tcp dport 15008 accept                               # HBONE is served natively
//!     meta l4proto tcp fib daddr type local redirect to :15006  # inbound TCP for this pod
//!   }
//!   chain output-nat { type nat hook output priority -100
//!     ct mark == 0x222 accept                              # opened by an agent (below)
//!     ct mark == 0x111 accept
//!     oifname "lo" accept                                  # loopback and calls to self
//!     ip daddr PROBE_V4 accept ; ip6 daddr PROBE_V6 accept
//!     meta l4proto tcp redirect to :15001                  # all other outbound TCP
//!   }
//! }
//! ```
//! and one exemption table per agent, installed by that agent before it binds the pod's
//! listeners ([`AgentCgroup`]):
//! ```text
//! table inet ambit-agent-<cgroup id> {
//!   chain output { type filter hook output priority -175   # after conntrack, before mangle
//!     socket cgroupv2 level L == ID  ct direction original  oifname "lo"  ct mark set 0x111
//!     socket cgroupv2 level L == ID  ct direction original  oifname != "lo" ct mark set 0x222
//!   }
//! }
//! ```
//! The agent's own connections are recognised by the cgroup of the socket that opens them,
//! which a process in the pod cannot change (it would need write access to the host's cgroup
//! tree), and the verdict is carried by the conntrack mark, which it cannot set either
//! (CAP_NET_ADMIN). A socket mark (SO_MARK) is not used: CAP_NET_RAW, which containers have by
//! default, is enough to set one. Each agent owns its exemption table, installed from its own
//! cgroup namespace: the kernel counts the level from the installing process's cgroup
//! namespace root, so two agents (an upgrade's old and new pod) never need each other's view.
//!
//! Replacing is atomic: "ensure table; delete table; create table, chains, rules" is one batch.
//! Every rule carries a tag (chain, index, digest of its expressions) as user data; [`verify`]
//! compares what the kernel holds — chains with their hooks, priorities and types, every
//! rule's expressions in order — with the expected set, so a rule rewritten in place (tag kept)
//! is found as well as a missing one.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::nft::{self, Batch, Chain, DumpedChain, Expr, Hook, NftSocket, Rule};
use crate::{
    AGENT_CONN_MARK, CONN_MARK, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT,
};

/// Name of Ambit's redirect table inside every captured pod.
pub const TABLE: &str = "ambit";
/// Prefix of the agents' exemption tables.
pub const AGENT_TABLE_PREFIX: &str = "ambit-agent-";
/// Priority of the exemption chain: after conntrack (-200) has attached the connection, before
/// `output-mangle` (-150) reads its mark.
const AGENT_CHAIN_PRIORITY: i32 = -175;
/// Priority of the redirect chains (`dstnat`); a foreign base chain at this priority or before
/// it on the same hooks can change the capture decision (NAT first, notrack, conntrack marks).
const NAT_PRIORITY: i32 = -100;

/// Default kubelet-probe source addresses (the SNAT addresses Istio uses, for compatibility).
pub const DEFAULT_PROBE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
pub const DEFAULT_PROBE_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// The redirect table's settings. (Records written before the cgroup exemption also carry an
/// `agent_mark`; it is ignored.)
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleSet {
    /// Sources exempted from inbound capture (kubelet probes).
    pub probe_v4: Vec<Ipv4Addr>,
    pub probe_v6: Vec<Ipv6Addr>,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self {
            probe_v4: vec![DEFAULT_PROBE_V4],
            probe_v6: vec![DEFAULT_PROBE_V6],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nft(#[from] nft::Error),
    #[error("table inet {0} is missing")]
    Missing(String),
    #[error("table inet {0} differs from the expected rule set: {1}")]
    Differs(String, String),
    #[error("a foreign base chain runs before Ambit's capture decision: {0}")]
    Foreign(String),
}

/// The redirect table's base chains.
pub fn chains() -> [Chain; 3] {
    [
        Chain {
            name: "output-mangle".into(),
            kind: "route",
            hook: Hook::Output,
            priority: -150,
        },
        Chain {
            name: "prerouting-nat".into(),
            kind: "nat",
            hook: Hook::Prerouting,
            priority: -100,
        },
        Chain {
            name: "output-nat".into(),
            kind: "nat",
            hook: Hook::Output,
            priority: -100,
        },
    ]
}

fn load_meta(key: u32) -> Expr {
    Expr::Meta {
        key,
        dreg: nft::REG_1,
    }
}

fn eq(data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg: nft::REG_1,
        eq: true,
        data,
    }
}

fn ctmark_is(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Ct {
            key: nft::CT_MARK,
            dreg: nft::REG_1,
        },
        eq(mark.to_ne_bytes().to_vec()),
    ]
}

fn set_reg(data: Vec<u8>) -> Expr {
    Expr::Immediate {
        dreg: nft::REG_1,
        data,
    }
}

fn tcp() -> Vec<Expr> {
    vec![
        load_meta(nft::META_L4PROTO),
        eq(vec![libc::IPPROTO_TCP as u8]),
    ]
}

/// `ip saddr/daddr == addr` (offset 12 = source, 16 = destination).
fn ip4(offset: u32, addr: Ipv4Addr) -> Vec<Expr> {
    vec![
        load_meta(nft::META_NFPROTO),
        eq(vec![nft::NFPROTO_IPV4]),
        Expr::Payload {
            base: nft::PAYLOAD_NETWORK,
            offset,
            len: 4,
            dreg: nft::REG_1,
        },
        eq(addr.octets().to_vec()),
    ]
}

/// `ip6 saddr/daddr == addr` (offset 8 = source, 24 = destination).
fn ip6(offset: u32, addr: Ipv6Addr) -> Vec<Expr> {
    vec![
        load_meta(nft::META_NFPROTO),
        eq(vec![nft::NFPROTO_IPV6]),
        Expr::Payload {
            base: nft::PAYLOAD_NETWORK,
            offset,
            len: 16,
            dreg: nft::REG_1,
        },
        eq(addr.octets().to_vec()),
    ]
}

fn then(mut m: Vec<Expr>, tail: Vec<Expr>) -> Vec<Expr> {
    m.extend(tail);
    m
}

fn accept() -> Vec<Expr> {
    vec![Expr::Verdict(nft::NF_ACCEPT)]
}

/// `redirect to :port` (the caller matches TCP first).
fn redirect_to(port: u16) -> Vec<Expr> {
    vec![
        set_reg(port.to_be_bytes().to_vec()),
        Expr::Redir {
            port_reg: nft::REG_1,
        },
    ]
}

impl RuleSet {
    /// The rules, in order, each with its tag.
    pub fn rules(&self) -> Vec<Rule> {
        let mut raw: Vec<(&str, Vec<Expr>)> = vec![(
            "output-mangle",
            then(
                ctmark_is(CONN_MARK),
                vec![
                    set_reg(CONN_MARK.to_ne_bytes().to_vec()),
                    Expr::MetaSet {
                        key: nft::META_MARK,
                        sreg: nft::REG_1,
                    },
                ],
            ),
        )];
        for a in &self.probe_v4 {
            raw.push(("prerouting-nat", then(ip4(12, *a), accept())));
        }
        for a in &self.probe_v6 {
            raw.push(("prerouting-nat", then(ip6(8, *a), accept())));
        }
        let mut dport = tcp();
        dport.extend([
            Expr::Payload {
                base: nft::PAYLOAD_TRANSPORT,
                offset: 2,
                len: 2,
                dreg: nft::REG_1,
            },
            eq(INBOUND_HBONE_PORT.to_be_bytes().to_vec()),
        ]);
        raw.push(("prerouting-nat", then(dport, accept())));
        // Only what is addressed to the pod itself: a packet routed to the pod for a foreign
        // address (or any non-local one) is never handed to the agent.
        let mut local = tcp();
        local.extend([
            Expr::Fib {
                result: nft::FIB_RESULT_ADDRTYPE,
                flags: nft::FIB_F_DADDR,
                dreg: nft::REG_1,
            },
            eq(nft::RTN_LOCAL.to_ne_bytes().to_vec()),
        ]);
        raw.push((
            "prerouting-nat",
            then(local, redirect_to(INBOUND_PLAINTEXT_PORT)),
        ));
        raw.push(("output-nat", then(ctmark_is(AGENT_CONN_MARK), accept())));
        raw.push(("output-nat", then(ctmark_is(CONN_MARK), accept())));
        raw.push((
            "output-nat",
            then(vec![load_meta(nft::META_OIFNAME), eq(lo_name())], accept()),
        ));
        for a in &self.probe_v4 {
            raw.push(("output-nat", then(ip4(16, *a), accept())));
        }
        for a in &self.probe_v6 {
            raw.push(("output-nat", then(ip6(24, *a), accept())));
        }
        raw.push(("output-nat", then(tcp(), redirect_to(OUTBOUND_PORT))));

        tagged("ambit", raw)
    }

    /// Installs (or atomically replaces) the rule set through `sock`, which must have been
    /// opened inside the pod's namespace.
    pub fn install(&self, sock: &NftSocket) -> Result<(), Error> {
        install(sock, TABLE, &chains(), &self.rules())
    }

    /// Checks that the namespace holds exactly this rule set.
    pub fn verify(&self, sock: &NftSocket) -> Result<(), Error> {
        verify(sock, TABLE, &chains(), &self.rules())
    }
}

/// An agent's cgroup (v2): its sockets, and only they, skip the redirect. `level` is the
/// cgroup's depth below the root of the agent's own cgroup namespace, `id` its cgroup id (the
/// inode number of its directory in cgroupfs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentCgroup {
    pub id: u64,
    pub level: u32,
}

impl AgentCgroup {
    /// The agent's exemption table in every pod it serves.
    pub fn table(&self) -> String {
        format!("{AGENT_TABLE_PREFIX}{:x}", self.id)
    }

    fn chains() -> [Chain; 1] {
        [Chain {
            name: "output".into(),
            kind: "filter",
            hook: Hook::Output,
            priority: AGENT_CHAIN_PRIORITY,
        }]
    }

    pub fn rules(&self) -> Vec<Rule> {
        let mine = vec![
            Expr::Socket {
                key: nft::SOCKET_CGROUPV2,
                dreg: nft::REG_1,
                level: self.level,
            },
            eq(self.id.to_ne_bytes().to_vec()),
            Expr::Ct {
                key: nft::CT_DIRECTION,
                dreg: nft::REG_1,
            },
            eq(vec![nft::CT_DIR_ORIGINAL]),
            load_meta(nft::META_OIFNAME),
        ];
        let mark = |m: u32| {
            vec![
                set_reg(m.to_ne_bytes().to_vec()),
                Expr::CtSet {
                    key: nft::CT_MARK,
                    sreg: nft::REG_1,
                },
            ]
        };
        let lo = |is: bool| Expr::Cmp {
            sreg: nft::REG_1,
            eq: is,
            data: lo_name(),
        };
        // To a local address (delivery to the app, from the client's address): the app's
        // replies must come back to the agent. Anywhere else: just not redirected.
        let to_local = then(then(mine.clone(), vec![lo(true)]), mark(CONN_MARK));
        let elsewhere = then(then(mine, vec![lo(false)]), mark(AGENT_CONN_MARK));
        tagged(
            &self.table(),
            vec![("output", to_local), ("output", elsewhere)],
        )
    }

    /// Installs (or atomically replaces) this agent's exemption table through `sock`.
    pub fn install(&self, sock: &NftSocket) -> Result<(), Error> {
        install(sock, &self.table(), &Self::chains(), &self.rules())
    }

    pub fn verify(&self, sock: &NftSocket) -> Result<(), Error> {
        verify(sock, &self.table(), &Self::chains(), &self.rules())
    }

    /// Removes this agent's exemption table; succeeds when it is already gone.
    pub fn remove(&self, sock: &NftSocket) -> Result<(), Error> {
        remove_table(sock, &self.table())
    }
}

fn lo_name() -> Vec<u8> {
    let mut lo = vec![0u8; 16];
    lo[..2].copy_from_slice(b"lo");
    lo
}

fn tagged(prefix: &str, raw: Vec<(&str, Vec<Expr>)>) -> Vec<Rule> {
    raw.into_iter()
        .enumerate()
        .map(|(i, (chain, exprs))| Rule {
            tag: format!("{prefix}/{i}/{:016x}", digest(&exprs)).into_bytes(),
            chain: chain.to_string(),
            exprs,
        })
        .collect()
}

fn install(sock: &NftSocket, table: &str, chains: &[Chain], rules: &[Rule]) -> Result<(), Error> {
    let mut b = Batch::new();
    b.ensure_table(nft::NFPROTO_INET, table);
    b.delete_table(nft::NFPROTO_INET, table);
    b.ensure_table(nft::NFPROTO_INET, table);
    for c in chains {
        b.add_chain(nft::NFPROTO_INET, table, c);
    }
    for r in rules {
        b.add_rule(nft::NFPROTO_INET, table, r);
    }
    sock.apply(b)?;
    Ok(())
}

/// Compares the kernel's copy of `table` with the expected chains and rules: the same chains
/// (hook, priority, type), and in each chain the same rules in the same order, expression by
/// expression.
fn verify(sock: &NftSocket, table: &str, chains: &[Chain], rules: &[Rule]) -> Result<(), Error> {
    let differs = |why: String| Error::Differs(table.to_string(), why);
    let dumped = sock
        .dump_rules(nft::NFPROTO_INET, table)?
        .ok_or_else(|| Error::Missing(table.to_string()))?;
    let mut have: Vec<_> = sock
        .dump_chains(nft::NFPROTO_INET)?
        .into_iter()
        .filter(|c| c.table == table)
        .map(|c| (c.name, c.hook, c.kind))
        .collect();
    let mut want: Vec<_> = chains
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                Some((c.hook as u32, c.priority)),
                Some(c.kind.to_string()),
            )
        })
        .collect();
    have.sort();
    want.sort();
    if have != want {
        return Err(differs(format!(
            "chains {have:?}, expected {want:?} (name, (hook, priority), type)"
        )));
    }
    for c in chains {
        let got: Vec<_> = dumped.iter().filter(|d| d.chain == c.name).collect();
        let exp: Vec<_> = rules.iter().filter(|r| r.chain == c.name).collect();
        if got.len() != exp.len() {
            return Err(differs(format!(
                "chain {} holds {} rules, {} expected",
                c.name,
                got.len(),
                exp.len()
            )));
        }
        for (i, (g, e)) in got.iter().zip(&exp).enumerate() {
            if g.exprs != e.exprs || g.tag != e.tag {
                return Err(differs(format!(
                    "rule {i} of chain {} ({}) is altered: {:?}",
                    c.name,
                    String::from_utf8_lossy(&e.tag),
                    g.exprs
                )));
            }
        }
    }
    Ok(())
}

/// Base chains of other tables that run on the capture's hooks at or before its NAT decision
/// (prerouting and output, priority ≤ dstnat): they can take that decision away (their own
/// NAT, `notrack`, a conntrack mark that reads as "opened by an agent"). A pod without
/// CAP_NET_ADMIN cannot add one.
pub fn foreign_chains(sock: &NftSocket) -> Result<Vec<DumpedChain>, Error> {
    Ok(sock
        .dump_chains(nft::NFPROTO_UNSPEC)?
        .into_iter()
        .filter(|c| !(c.family == nft::NFPROTO_INET && is_ambit_table(&c.table)))
        .filter(|c| {
            matches!(c.hook, Some((h, p))
                if (h == Hook::Prerouting as u32 || h == Hook::Output as u32) && p <= NAT_PRIORITY)
        })
        .collect())
}

/// Fails when [`foreign_chains`] finds any.
pub fn no_foreign_chains(sock: &NftSocket) -> Result<(), Error> {
    let found = foreign_chains(sock)?;
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::Foreign(
        found
            .iter()
            .map(|c| {
                let (hook, prio) = c.hook.unwrap_or_default();
                let hook = if hook == Hook::Output as u32 {
                    "output"
                } else {
                    "prerouting"
                };
                format!(
                    "table {} {} chain {} (type {} hook {hook} priority {prio})",
                    family_name(c.family),
                    c.table,
                    c.name,
                    c.kind.as_deref().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

fn family_name(f: u8) -> &'static str {
    match f {
        nft::NFPROTO_INET => "inet",
        nft::NFPROTO_IPV4 => "ip",
        nft::NFPROTO_IPV6 => "ip6",
        _ => "other",
    }
}

fn is_ambit_table(t: &str) -> bool {
    t == TABLE || t.starts_with(AGENT_TABLE_PREFIX)
}

/// Removes the redirect table and every agent's exemption table (the pod is going away);
/// succeeds when they are already gone.
pub fn remove(sock: &NftSocket) -> Result<(), Error> {
    let mut tables: Vec<String> = sock
        .dump_chains(nft::NFPROTO_INET)?
        .into_iter()
        .map(|c| c.table)
        .filter(|t| t.starts_with(AGENT_TABLE_PREFIX))
        .collect();
    tables.dedup();
    tables.push(TABLE.to_string());
    let mut b = Batch::new();
    for t in &tables {
        b.ensure_table(nft::NFPROTO_INET, t);
        b.delete_table(nft::NFPROTO_INET, t);
    }
    sock.apply(b)?;
    Ok(())
}

fn remove_table(sock: &NftSocket, table: &str) -> Result<(), Error> {
    let mut b = Batch::new();
    b.ensure_table(nft::NFPROTO_INET, table);
    b.delete_table(nft::NFPROTO_INET, table);
    sock.apply(b)?;
    Ok(())
}

/// FNV-1a over the debug form of the expressions: stable for a given build and rule set.
fn digest(exprs: &[Expr]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{exprs:?}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_the_exemption_tracks_the_cgroup() {
        let a = RuleSet::default().rules();
        let mut tags: Vec<_> = a.iter().map(|r| r.tag.clone()).collect();
        tags.sort();
        tags.dedup();
        assert_eq!(tags.len(), a.len());
        let one = AgentCgroup { id: 7, level: 3 };
        let other = AgentCgroup { id: 8, level: 3 };
        assert_ne!(one.table(), other.table());
        assert_ne!(one.rules()[0].exprs, other.rules()[0].exprs);
        assert_ne!(
            one.rules()[0].exprs,
            AgentCgroup { id: 7, level: 2 }.rules()[0].exprs,
            "the level is part of the match"
        );
    }

    #[test]
    fn no_rule_of_the_redirect_table_trusts_a_socket_mark() {
        for r in RuleSet::default().rules() {
            assert!(
                !r.exprs.contains(&load_meta(nft::META_MARK)),
                "rule {} reads meta mark, which a pod with CAP_NET_RAW can set",
                String::from_utf8_lossy(&r.tag)
            );
        }
    }

    #[test]
    fn outbound_redirect_is_last_and_hbone_is_exempt() {
        let rules = RuleSet::default().rules();
        let last = rules.last().unwrap();
        assert_eq!(last.chain, "output-nat");
        assert!(last.exprs.contains(&Expr::Immediate {
            dreg: nft::REG_1,
            data: OUTBOUND_PORT.to_be_bytes().to_vec()
        }));
        let pre: Vec<_> = rules
            .iter()
            .filter(|r| r.chain == "prerouting-nat")
            .collect();
        let hbone = pre
            .iter()
            .position(|r| {
                r.exprs
                    .iter()
                    .any(|e| *e == eq(INBOUND_HBONE_PORT.to_be_bytes().to_vec()))
            })
            .unwrap();
        assert_eq!(
            hbone,
            pre.len() - 2,
            "15008 accept comes right before the 15006 redirect"
        );
    }
}
