//! L4 authorization at the destination, with Istio's `security.istio.io` semantics (deny
//! before allow; no ALLOW policy selecting the pod means allowed). This module holds the compiled form and the evaluation;
//! turning manifests into it (validation, L7 conversion, fail-closed handling) is the node
//! agent's job.
//!
//! Structure: policy → rules (OR) → clauses (AND: one from `from`, one from `to`, one per
//! `when`) → matches (OR: one per entry) → fields (AND; a field holds if any value matches, a
//! negated field if none does).
//! - a policy without rules never matches (`spec: {}` ALLOW denies all, DENY does nothing);
//! - a rule without clauses matches everything (`rules: [{}]`);
//! - a match without fields never matches, nor does a clause without matches.
//!
//! Order: DENY (PeerAuthentication STRICT included) before ALLOW; no ALLOW policy → allow;
//! otherwise some ALLOW must match.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::identity::Identity;

/// A string match: exact, prefix (`abc*`), suffix (`*abc`) or presence (`*`, non-empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StrMatch {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StrMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.into())
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.into())
        } else {
            StrMatch::Exact(s.into())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Presence => !v.is_empty(),
        }
    }
}

/// What a field looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attr {
    /// `<td>/ns/<ns>/sa/<sa>` of the peer; empty without an identity (plaintext).
    SourcePrincipal,
    /// The `ns` of the peer's identity.
    SourceNamespace,
    /// `<ns>/<sa>` of the peer's identity.
    SourceServiceAccount,
    SourceIp,
    DestinationIp,
    DestinationPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Str(StrMatch),
    Net(IpNet),
    Port(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub attr: Attr,
    pub values: Vec<Value>,
    /// `not*` fields and `notValues`: true when no value matches.
    pub negated: bool,
}

/// Fields that must all hold; empty never matches.
pub type Match = Vec<Field>;
/// Matches of which one must hold; empty never matches.
pub type Clause = Vec<Match>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// All must hold; none means the rule matches everything.
    pub clauses: Vec<Clause>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// Which workloads a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every workload of the mesh (root namespace, no selector).
    Mesh,
    /// Every workload of a namespace.
    Namespace(String),
    /// Workloads with these labels, in one namespace, or in all (root namespace).
    Selector {
        namespace: Option<String>,
        labels: BTreeMap<String, String>,
    },
}

impl Scope {
    pub fn applies(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Scope::Mesh => true,
            Scope::Namespace(ns) => ns == namespace,
            Scope::Selector {
                namespace: ns,
                labels: want,
            } => {
                ns.as_deref().is_none_or(|n| n == namespace)
                    && want.iter().all(|(k, v)| labels.get(k) == Some(v))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name` of the object.
    pub key: String,
    pub action: Action,
    pub scope: Scope,
    pub rules: Vec<Rule>,
}

/// The facts of one connection at its destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The peer's verified identity; `None` for plaintext (15006).
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

impl Decision {
    pub fn allowed(&self) -> bool {
        *self == Decision::Allow
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::Deny(why) => write!(f, "denied: {why}"),
        }
    }
}

fn net_contains(v: &Value, ip: IpAddr) -> bool {
    matches!(v, Value::Net(n) if n.contains(&ip.to_canonical()))
}

impl Field {
    fn holds(&self, c: &Connection) -> bool {
        let principal = c
            .src_identity
            .as_ref()
            .map(Identity::principal)
            .unwrap_or_default();
        let any = |v: &Value| match (self.attr, v) {
            (Attr::SourcePrincipal, Value::Str(m)) => m.matches(principal),
            (Attr::SourceNamespace, Value::Str(m)) => {
                m.matches(c.src_identity.as_ref().map_or("", Identity::namespace))
            }
            (Attr::SourceServiceAccount, Value::Str(m)) => m.matches(
                &c.src_identity
                    .as_ref()
                    .map(|i| format!("{}/{}", i.namespace(), i.service_account()))
                    .unwrap_or_default(),
            ),
            (Attr::SourceIp, v) => net_contains(v, c.src_ip),
            (Attr::DestinationIp, v) => net_contains(v, c.dst_ip),
            (Attr::DestinationPort, Value::Port(p)) => *p == c.dst_port,
            _ => false,
        };
        self.values.iter().any(any) != self.negated
    }
}

fn match_holds(m: &Match, c: &Connection) -> bool {
    !m.is_empty() && m.iter().all(|f| f.holds(c))
}

impl Rule {
    pub fn matches(&self, c: &Connection) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| match_holds(m, c)))
    }
}

impl Policy {
    pub fn matches(&self, c: &Connection) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }
}

/// PeerAuthentication modes; `Unset` inherits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    Unset,
    Strict,
    Permissive,
    Disable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub key: String,
    pub scope: Scope,
    pub mode: MtlsMode,
    pub port_modes: BTreeMap<u16, MtlsMode>,
    /// Age order (older first) for conflicts at the same level.
    pub order: (String, String),
}

/// Effective mTLS mode for a destination port: workload > namespace > mesh, port-level
/// overrides of the workload's policy last; among policies of one level the oldest wins.
pub fn effective_mode(
    peer_auths: &[PeerAuthentication],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsMode {
    let oldest = |pick: &dyn Fn(&Scope) -> bool| {
        peer_auths
            .iter()
            .filter(|p| pick(&p.scope) && p.scope.applies(namespace, labels))
            .min_by(|a, b| a.order.cmp(&b.order))
    };
    let mesh = oldest(&|s| matches!(s, Scope::Mesh));
    let ns = oldest(&|s| matches!(s, Scope::Namespace(_)));
    let wl = oldest(&|s| matches!(s, Scope::Selector { .. }));
    let mut mode = MtlsMode::Permissive;
    for p in [mesh, ns, wl].into_iter().flatten() {
        if p.mode != MtlsMode::Unset {
            mode = p.mode;
        }
    }
    if let Some(p) = wl.or(ns).or(mesh)
        && let Some(m) = p.port_modes.get(&port)
        && *m != MtlsMode::Unset
    {
        mode = *m;
    }
    mode
}

/// Decides one connection to a workload of `namespace` with `labels`.
pub fn evaluate(
    policies: &[std::sync::Arc<Policy>],
    peer_auths: &[PeerAuthentication],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    c: &Connection,
) -> Decision {
    if c.src_identity.is_none()
        && effective_mode(peer_auths, namespace, labels, c.dst_port) == MtlsMode::Strict
    {
        return Decision::Deny("STRICT mTLS: plaintext refused".into());
    }
    let mut allows = 0;
    let mut allowed = false;
    for p in policies
        .iter()
        .filter(|p| p.scope.applies(namespace, labels))
    {
        match p.action {
            Action::Deny if p.matches(c) => {
                return Decision::Deny(format!("explicitly denied by {}", p.key));
            }
            Action::Deny => {}
            Action::Allow => {
                allows += 1;
                allowed = allowed || p.matches(c);
            }
        }
    }
    if allows == 0 || allowed {
        Decision::Allow
    } else {
        Decision::Deny("allow policies exist, but none allowed".into())
    }
}
