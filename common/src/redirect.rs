//! Ambit's in-pod redirect rules, as one nftables table installed in a single transaction.
//!
//! ```text
//! table inet ambit {
//!   chain prerouting-mangle { type filter hook prerouting priority mangle
//!     meta mark == AGENT_MARK  ct mark set 0x111          # agent-opened conns (spoofed source)
//!   }
//!   chain output-mangle { type route hook output priority mangle
//!     ct mark == 0x111  meta mark set 0x111               # app replies -> local table (route.rs)
//!   }
//!   chain prerouting-nat { type nat hook prerouting priority dstnat
//!     meta mark == AGENT_MARK accept
//!     ip saddr PROBE_V4 accept ; ip6 saddr PROBE_V6 accept  # kubelet probes
//!     tcp dport 15008 accept                               # HBONE is served natively
//!     meta l4proto tcp redirect to :15006                  # all other inbound TCP
//!   }
//!   chain output-nat { type nat hook output priority -100
//!     meta mark == AGENT_MARK accept                       # the agent's own sockets
//!     ct mark == 0x111 accept
//!     oifname "lo" accept                                  # loopback and calls to self
//!     ip daddr PROBE_V4 accept ; ip6 daddr PROBE_V6 accept
//!     meta l4proto tcp redirect to :15001                  # all other outbound TCP
//!   }
//! }
//! ```
//! Replacing is atomic: "ensure table; delete table; create table, chains, rules" is one batch.
//! Every rule carries a tag (chain, index, digest of its expressions) as user data, so
//! [`verify`] can prove from a dump that exactly this rule set is in place.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::nft::{self, Batch, Chain, Expr, Hook, NftSocket, Rule};
use crate::{CONN_MARK, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// Name of Ambit's table inside every captured pod.
pub const TABLE: &str = "ambit";

/// Default kubelet-probe source addresses (the SNAT addresses Istio uses, for compatibility).
pub const DEFAULT_PROBE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
pub const DEFAULT_PROBE_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleSet {
    /// SO_MARK carried by the agent's sockets.
    pub agent_mark: u32,
    /// Sources exempted from inbound capture (kubelet probes).
    pub probe_v4: Vec<Ipv4Addr>,
    pub probe_v6: Vec<Ipv6Addr>,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self {
            agent_mark: crate::DEFAULT_AGENT_MARK,
            probe_v4: vec![DEFAULT_PROBE_V4],
            probe_v6: vec![DEFAULT_PROBE_V6],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nft(#[from] nft::Error),
    #[error("table inet {TABLE} is missing")]
    Missing,
    #[error("table inet {TABLE} differs from the expected rule set: {0}")]
    Differs(String),
}

fn chains() -> [Chain; 4] {
    [
        Chain {
            name: "prerouting-mangle".into(),
            kind: "filter",
            hook: Hook::Prerouting,
            priority: -150,
        },
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

fn mark_is(mark: u32) -> Vec<Expr> {
    vec![load_meta(nft::META_MARK), eq(mark.to_ne_bytes().to_vec())]
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

fn redirect(port: u16) -> Vec<Expr> {
    then(
        tcp(),
        vec![
            set_reg(port.to_be_bytes().to_vec()),
            Expr::Redir {
                port_reg: nft::REG_1,
            },
        ],
    )
}

impl RuleSet {
    /// The rules, in order, each with its tag.
    pub fn rules(&self) -> Vec<Rule> {
        let mut raw: Vec<(&str, Vec<Expr>)> = vec![
            (
                "prerouting-mangle",
                then(
                    mark_is(self.agent_mark),
                    vec![
                        set_reg(CONN_MARK.to_ne_bytes().to_vec()),
                        Expr::CtSet {
                            key: nft::CT_MARK,
                            sreg: nft::REG_1,
                        },
                    ],
                ),
            ),
            (
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
            ),
            ("prerouting-nat", then(mark_is(self.agent_mark), accept())),
        ];
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
        raw.push(("prerouting-nat", redirect(INBOUND_PLAINTEXT_PORT)));
        raw.push(("output-nat", then(mark_is(self.agent_mark), accept())));
        raw.push(("output-nat", then(ctmark_is(CONN_MARK), accept())));
        let mut lo = [0u8; 16];
        lo[..2].copy_from_slice(b"lo");
        raw.push((
            "output-nat",
            then(
                vec![load_meta(nft::META_OIFNAME), eq(lo.to_vec())],
                accept(),
            ),
        ));
        for a in &self.probe_v4 {
            raw.push(("output-nat", then(ip4(16, *a), accept())));
        }
        for a in &self.probe_v6 {
            raw.push(("output-nat", then(ip6(24, *a), accept())));
        }
        raw.push(("output-nat", redirect(OUTBOUND_PORT)));

        raw.into_iter()
            .enumerate()
            .map(|(i, (chain, exprs))| Rule {
                tag: format!("ambit/{i}/{:016x}", digest(&exprs)).into_bytes(),
                chain: chain.to_string(),
                exprs,
            })
            .collect()
    }

    /// Installs (or atomically replaces) the rule set through `sock`, which must have been
    /// opened inside the pod's namespace.
    pub fn install(&self, sock: &NftSocket) -> Result<(), Error> {
        let mut b = Batch::new();
        b.ensure_table(nft::NFPROTO_INET, TABLE);
        b.delete_table(nft::NFPROTO_INET, TABLE);
        b.ensure_table(nft::NFPROTO_INET, TABLE);
        for c in chains() {
            b.add_chain(nft::NFPROTO_INET, TABLE, &c);
        }
        for r in self.rules() {
            b.add_rule(nft::NFPROTO_INET, TABLE, &r);
        }
        sock.apply(b)?;
        Ok(())
    }

    /// Checks that the namespace holds exactly this rule set.
    pub fn verify(&self, sock: &NftSocket) -> Result<(), Error> {
        let dumped = sock
            .dump_rules(nft::NFPROTO_INET, TABLE)?
            .ok_or(Error::Missing)?;
        let want = self.rules();
        if dumped.len() != want.len() {
            return Err(Error::Differs(format!(
                "{} rules found, {} expected",
                dumped.len(),
                want.len()
            )));
        }
        // The kernel dumps chain by chain; compare as sets of (chain, tag).
        for w in &want {
            if !dumped.iter().any(|d| d.chain == w.chain && d.tag == w.tag) {
                return Err(Error::Differs(format!(
                    "rule {} of chain {} is missing or altered",
                    String::from_utf8_lossy(&w.tag),
                    w.chain
                )));
            }
        }
        Ok(())
    }
}

/// Removes the table; succeeds when it is already gone.
pub fn remove(sock: &NftSocket) -> Result<(), Error> {
    let mut b = Batch::new();
    b.ensure_table(nft::NFPROTO_INET, TABLE);
    b.delete_table(nft::NFPROTO_INET, TABLE);
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
    fn tags_are_unique_and_track_the_mark() {
        let a = RuleSet::default().rules();
        let mut tags: Vec<_> = a.iter().map(|r| r.tag.clone()).collect();
        tags.sort();
        tags.dedup();
        assert_eq!(tags.len(), a.len());
        let b = RuleSet {
            agent_mark: 0x1234,
            ..RuleSet::default()
        }
        .rules();
        assert_ne!(
            a[0].tag, b[0].tag,
            "a different mark must change the digest"
        );
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
