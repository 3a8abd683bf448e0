//! AuthorizationPolicy and PeerAuthentication (`security.istio.io/v1` and `v1beta1`) from
//! manifests, validated and compiled to [`ambit_proxy::authz`].
//!
//! Every problem names the object and the field (`spec.rules[0].from[1].source.ipBlocks[2]`).
//! A policy that cannot be enforced as written never widens access — its scope fails closed:
//! - an invalid ALLOW policy is kept as an ALLOW that allows nothing (connections in its scope
//!   pass only if another ALLOW policy allows them);
//! - an invalid DENY policy, a policy with an unknown action, and a CUSTOM policy (an external
//!   authorizer Ambit does not call) deny every connection in their scope;
//! - an invalid PeerAuthentication is STRICT for its scope;
//! - AUDIT policies have no effect on access and are ignored, with a status saying so.
//!
//! When the selector itself is unreadable the scope is the policy's whole namespace (the whole
//! mesh in the root namespace). HTTP-only (L7) fields follow Istio's strict conversion: an
//! ALLOW rule that uses one is dropped; a DENY keeps its L4 parts (an entry left without
//! fields never matches).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ambit_proxy::authz::{
    Action, Attr, Clause, Field, Match, MtlsMode, PeerAuthentication, Policy, Rule, Scope,
    StrMatch, Value,
};
use ipnet::IpNet;
use serde_yaml_ng::Value as Yaml;

pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Enforced as written.
    Accepted,
    /// Enforced, with parts converted (see the messages).
    Converted,
    /// Not enforced: no effect on access (AUDIT, waypoint policies).
    Ignored,
    /// Invalid or unsupported; its scope fails closed.
    Rejected,
}

/// How one object was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub kind: &'static str,
    pub key: String,
    pub state: State,
    pub messages: Vec<String>,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {:?}", self.kind, self.key, self.state)?;
        if !self.messages.is_empty() {
            write!(f, ": {}", self.messages.join("; "))?;
        }
        Ok(())
    }
}

/// Collects problems with their field paths.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: &str, msg: impl fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }
}

fn mapping<'a>(v: &'a Yaml, path: &str, p: &mut Problems) -> Option<&'a serde_yaml_ng::Mapping> {
    match v {
        Yaml::Mapping(m) => Some(m),
        Yaml::Null => None,
        _ => {
            p.add(path, "must be a mapping");
            None
        }
    }
}

/// The entries of a mapping as (key, value), with non-string keys reported.
fn entries<'a>(v: &'a Yaml, path: &str, p: &mut Problems) -> Vec<(String, &'a Yaml)> {
    let Some(m) = mapping(v, path, p) else {
        return Vec::new();
    };
    m.iter()
        .filter_map(|(k, v)| match k {
            Yaml::String(s) => Some((s.clone(), v)),
            // Port numbers as keys (portLevelMtls) are written unquoted.
            Yaml::Number(n) => Some((n.to_string(), v)),
            _ => {
                p.add(path, format!("key {k:?} is not a string"));
                None
            }
        })
        .collect()
}

fn string(v: &Yaml, path: &str, p: &mut Problems) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => {
            p.add(path, "must be a string");
            None
        }
    }
}

fn strings(v: &Yaml, path: &str, p: &mut Problems) -> Vec<String> {
    match v {
        Yaml::Sequence(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, x)| string(x, &format!("{path}[{i}]"), p))
            .collect(),
        Yaml::Null => Vec::new(),
        _ => {
            p.add(path, "must be a list of strings");
            Vec::new()
        }
    }
}

fn sequence<'a>(v: &'a Yaml, path: &str, p: &mut Problems) -> &'a [Yaml] {
    match v {
        Yaml::Sequence(items) => items,
        Yaml::Null => &[],
        _ => {
            p.add(path, "must be a list");
            &[]
        }
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// Builds one field from string values; `None` when the list is empty (unset).
fn field(
    attr: Attr,
    negated: bool,
    values: &[String],
    path: &str,
    policy_ns: &str,
    p: &mut Problems,
) -> Option<Field> {
    if values.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for (i, s) in values.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let v = match attr {
            Attr::SourceIp | Attr::DestinationIp => parse_net(s).map(Value::Net),
            Attr::DestinationPort => parse_port(s).map(Value::Port),
            Attr::SourceServiceAccount => {
                // `sa` means `<policy namespace>/sa`; matched exactly, as Istio does (no
                // prefix, suffix or presence forms: `prod*` names no service account).
                let full = if s.contains('/') {
                    s.clone()
                } else {
                    format!("{policy_ns}/{s}")
                };
                Ok(Value::Str(StrMatch::Exact(full)))
            }
            _ => Ok(Value::Str(StrMatch::parse(s))),
        };
        match v {
            Ok(v) => out.push(v),
            Err(e) => p.add(&at, e),
        }
    }
    Some(Field {
        attr,
        values: out,
        negated,
    })
}

const L7_SOURCE: [&str; 4] = [
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];
const L7_OPERATION: [&str; 6] = [
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

fn source_attr(key: &str) -> Option<(Attr, bool)> {
    Some(match key {
        "principals" => (Attr::SourcePrincipal, false),
        "notPrincipals" => (Attr::SourcePrincipal, true),
        "namespaces" => (Attr::SourceNamespace, false),
        "notNamespaces" => (Attr::SourceNamespace, true),
        "serviceAccounts" => (Attr::SourceServiceAccount, false),
        "notServiceAccounts" => (Attr::SourceServiceAccount, true),
        "ipBlocks" => (Attr::SourceIp, false),
        "notIpBlocks" => (Attr::SourceIp, true),
        _ => return None,
    })
}

fn operation_attr(key: &str) -> Option<(Attr, bool)> {
    match key {
        "ports" => Some((Attr::DestinationPort, false)),
        "notPorts" => Some((Attr::DestinationPort, true)),
        _ => None,
    }
}

/// Maps a field name to what it matches and whether it is a `not*` field.
type AttrOf = fn(&str) -> Option<(Attr, bool)>;

fn when_attr(key: &str) -> Option<Attr> {
    Some(match key {
        "source.ip" => Attr::SourceIp,
        "source.namespace" => Attr::SourceNamespace,
        "source.principal" => Attr::SourcePrincipal,
        "destination.ip" => Attr::DestinationIp,
        "destination.port" => Attr::DestinationPort,
        _ => return None,
    })
}

/// One rule: the compiled clauses and the L7 attributes it used.
fn rule(v: &Yaml, path: &str, ns: &str, p: &mut Problems) -> (Rule, Vec<String>) {
    let mut clauses: Vec<Clause> = Vec::new();
    let mut l7 = Vec::new();
    for (key, val) in entries(v, path, p) {
        let at = format!("{path}.{key}");
        match key.as_str() {
            "from" | "to" => {
                let (inner, l4_keys): (&str, AttrOf) = if key == "from" {
                    ("source", source_attr)
                } else {
                    ("operation", operation_attr)
                };
                let l7_keys: &[&str] = if key == "from" {
                    &L7_SOURCE
                } else {
                    &L7_OPERATION
                };
                let mut clause = Clause::new();
                let items = sequence(val, &at, p);
                for (i, entry) in items.iter().enumerate() {
                    let ep = format!("{at}[{i}]");
                    let mut m = Match::new();
                    for (k, body) in entries(entry, &ep, p) {
                        if k != inner {
                            p.add(
                                &format!("{ep}.{k}"),
                                format!("unknown field (expected {inner})"),
                            );
                            continue;
                        }
                        let bp = format!("{ep}.{inner}");
                        for (fk, fv) in entries(body, &bp, p) {
                            let fp = format!("{bp}.{fk}");
                            if let Some((attr, neg)) = l4_keys(&fk) {
                                let vals = strings(fv, &fp, p);
                                m.extend(field(attr, neg, &vals, &fp, ns, p));
                            } else if l7_keys.contains(&fk.as_str()) {
                                if !strings(fv, &fp, p).is_empty() {
                                    l7.push(fp);
                                }
                            } else {
                                p.add(&fp, "unknown field");
                            }
                        }
                    }
                    clause.push(m);
                }
                if !items.is_empty() {
                    clauses.push(clause);
                }
            }
            "when" => {
                for (i, cond) in sequence(val, &at, p).iter().enumerate() {
                    let cp = format!("{at}[{i}]");
                    let (mut k, mut vals, mut nots) = (None, Vec::new(), Vec::new());
                    for (ck, cv) in entries(cond, &cp, p) {
                        let fp = format!("{cp}.{ck}");
                        match ck.as_str() {
                            "key" => k = string(cv, &fp, p),
                            "values" => vals = strings(cv, &fp, p),
                            "notValues" => nots = strings(cv, &fp, p),
                            _ => p.add(&fp, "unknown field"),
                        }
                    }
                    let Some(k) = k else {
                        p.add(&format!("{cp}.key"), "missing");
                        continue;
                    };
                    if vals.is_empty() && nots.is_empty() {
                        p.add(&cp, "needs values or notValues");
                        continue;
                    }
                    match when_attr(&k) {
                        Some(attr) => {
                            let mut m = Match::new();
                            m.extend(field(attr, false, &vals, &format!("{cp}.values"), ns, p));
                            m.extend(field(attr, true, &nots, &format!("{cp}.notValues"), ns, p));
                            clauses.push(vec![m]);
                        }
                        None => l7.push(format!("{cp} (key {k})")),
                    }
                }
            }
            _ => p.add(&at, "unknown field (expected from, to or when)"),
        }
    }
    (Rule { clauses }, l7)
}

fn selector(v: &Yaml, path: &str, p: &mut Problems) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let before = p.0.len();
    for (k, val) in entries(v, path, p) {
        let at = format!("{path}.{k}");
        if k != "matchLabels" {
            p.add(&at, "unknown field (expected matchLabels)");
            continue;
        }
        for (lk, lv) in entries(val, &at, p) {
            if let Some(s) = string(lv, &format!("{at}.{lk}"), p) {
                labels.insert(lk, s);
            }
        }
    }
    (p.0.len() == before).then_some(labels)
}

/// (namespace, name, key) of an object; problems for missing or wrong header fields.
fn header(obj: &Yaml, kind: &str, p: &mut Problems) -> (String, String) {
    let ns = obj
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Yaml::as_str)
        .unwrap_or("default")
        .to_owned();
    let name = match obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Yaml::as_str)
    {
        Some(n) => n.to_owned(),
        None => {
            p.add("metadata.name", "missing");
            "<unnamed>".into()
        }
    };
    match obj.get("apiVersion").and_then(Yaml::as_str) {
        Some(v) if API_VERSIONS.contains(&v) => {}
        other => p.add(
            "apiVersion",
            format!("{other:?} is not one of {API_VERSIONS:?} for {kind}"),
        ),
    }
    (ns, name)
}

fn scope_of(ns: &str, root_ns: &str, spec: &Yaml, p: &mut Problems) -> Scope {
    let sel = spec.get("selector").filter(|s| !s.is_null());
    let labels = sel.and_then(|s| selector(s, "spec.selector", p));
    let in_root = ns == root_ns;
    match (sel, labels) {
        (Some(_), Some(labels)) if !labels.is_empty() => Scope::Selector {
            namespace: (!in_root).then(|| ns.to_owned()),
            labels,
        },
        // No selector, an empty one, or an unreadable one: the whole namespace (or mesh).
        _ if in_root => Scope::Mesh,
        _ => Scope::Namespace(ns.to_owned()),
    }
}

/// Compiles one AuthorizationPolicy. `None` when it has no effect (ignored).
pub fn authorization_policy(obj: &Yaml, root_ns: &str) -> (Option<Policy>, Status) {
    let mut p = Problems::default();
    let (ns, name) = header(obj, "AuthorizationPolicy", &mut p);
    let key = format!("{ns}/{name}");
    let mut status = Status {
        kind: "AuthorizationPolicy",
        key: key.clone(),
        state: State::Accepted,
        messages: Vec::new(),
    };
    let empty = Yaml::Null;
    let spec = obj.get("spec").unwrap_or(&empty);
    let scope = scope_of(&ns, root_ns, spec, &mut p);
    let fields = spec_fields(spec, &empty, &mut p);
    if fields.waypoint && p.0.is_empty() {
        return ignored(
            status,
            "targets a waypoint (targetRef); not enforced by Ambit at L4",
        );
    }
    let action = match action_field(&fields.action, &mut p) {
        ActionField::Audit if p.0.is_empty() => {
            return ignored(
                status,
                "AUDIT is not supported at L4 and has no effect on access",
            );
        }
        ActionField::Known(a) => Some(a),
        ActionField::Audit | ActionField::Invalid => None,
    };
    let rules = l4_rules(fields.rules, &ns, action, &mut p, &mut status);
    if !p.0.is_empty() {
        return fail_closed(key, action, scope, p, status);
    }
    let action = action.expect("no problems means a known action");
    if rules.is_empty() {
        status.messages.push(match action {
            Action::Allow => {
                "no rules: denies every connection in its scope not allowed by another policy"
                    .into()
            }
            Action::Deny => "no enforceable rules: has no effect".into(),
        });
    }
    (
        Some(Policy {
            key,
            action,
            scope,
            rules,
        }),
        status,
    )
}

/// The fields of an AuthorizationPolicy's spec that decide what it does.
struct SpecFields<'a> {
    action: String,
    rules: &'a Yaml,
    /// `targetRef(s)`: the policy is meant for a waypoint (L7), not for Ambit.
    waypoint: bool,
}

fn spec_fields<'a>(spec: &'a Yaml, empty: &'a Yaml, p: &mut Problems) -> SpecFields<'a> {
    let mut f = SpecFields {
        action: "ALLOW".to_owned(),
        rules: empty,
        waypoint: false,
    };
    for (k, v) in entries(spec, "spec", p) {
        match k.as_str() {
            "selector" | "provider" => {}
            "action" => {
                if let Some(a) = string(v, "spec.action", p) {
                    f.action = a;
                }
            }
            "rules" => f.rules = v,
            "targetRef" | "targetRefs" => f.waypoint = true,
            _ => p.add(&format!("spec.{k}"), "unknown field"),
        }
    }
    f
}

enum ActionField {
    Known(Action),
    /// Valid in Istio, without effect on access.
    Audit,
    /// Unknown or unsupported (recorded as a problem).
    Invalid,
}

fn action_field(action: &str, p: &mut Problems) -> ActionField {
    match action {
        "ALLOW" => ActionField::Known(Action::Allow),
        "DENY" => ActionField::Known(Action::Deny),
        "AUDIT" => ActionField::Audit,
        "CUSTOM" => {
            p.add(
                "spec.action",
                "CUSTOM (an external authorizer) is not supported by Ambit",
            );
            ActionField::Invalid
        }
        other => {
            p.add(
                "spec.action",
                format!("{other:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
            );
            ActionField::Invalid
        }
    }
}

/// The rules as enforced at L4. A rule with HTTP attributes is omitted from an ALLOW (it
/// would never match at L4) and kept without them in a DENY (a superset: fails closed); either
/// way the status says so.
fn l4_rules(
    rules_v: &Yaml,
    ns: &str,
    action: Option<Action>,
    p: &mut Problems,
    status: &mut Status,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (i, r) in sequence(rules_v, "spec.rules", p).iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let (rule, l7) = rule(r, &path, ns, p);
        if l7.is_empty() {
            rules.push(rule);
            continue;
        }
        status.state = State::Converted;
        match action {
            Some(Action::Allow) => status.messages.push(format!(
                "{path} uses HTTP attributes ({}) and is omitted: an ALLOW rule that needs L7 never matches at L4",
                l7.join(", ")
            )),
            _ => {
                status.messages.push(format!(
                    "{path}: HTTP attributes ({}) omitted; the L4 part is enforced (a superset)",
                    l7.join(", ")
                ));
                rules.push(rule);
            }
        }
    }
    rules
}

fn ignored(mut status: Status, why: &str) -> (Option<Policy>, Status) {
    status.state = State::Ignored;
    status.messages.push(why.into());
    (None, status)
}

/// A policy with problems, in its fail-closed form: an ALLOW allows nothing in its scope;
/// anything else (a DENY, an unknown action) denies everything in it.
fn fail_closed(
    key: String,
    action: Option<Action>,
    scope: Scope,
    p: Problems,
    mut status: Status,
) -> (Option<Policy>, Status) {
    status.state = State::Rejected;
    status.messages = p.0;
    let (effect, action, rules) = match action {
        Some(Action::Allow) => (
            "fails closed: allows nothing in its scope",
            Action::Allow,
            Vec::new(),
        ),
        _ => (
            "fails closed: denies every connection in its scope",
            Action::Deny,
            vec![Rule::default()],
        ),
    };
    status.messages.push(effect.into());
    let fallback = Policy {
        key,
        action,
        scope,
        rules,
    };
    (Some(fallback), status)
}

fn mode(v: &Yaml, path: &str, p: &mut Problems) -> MtlsMode {
    let mut m = MtlsMode::Unset;
    for (k, val) in entries(v, path, p) {
        let at = format!("{path}.{k}");
        if k != "mode" {
            p.add(&at, "unknown field (expected mode)");
            continue;
        }
        m = match string(val, &at, p).as_deref() {
            Some("UNSET") => MtlsMode::Unset,
            Some("STRICT") => MtlsMode::Strict,
            Some("PERMISSIVE") => MtlsMode::Permissive,
            Some("DISABLE") => MtlsMode::Disable,
            Some(other) => {
                p.add(
                    &at,
                    format!("{other:?} is not UNSET, STRICT, PERMISSIVE or DISABLE"),
                );
                MtlsMode::Strict
            }
            None => MtlsMode::Strict,
        };
    }
    m
}

/// Compiles one PeerAuthentication; an invalid one is STRICT for its scope.
pub fn peer_authentication(obj: &Yaml, root_ns: &str) -> (PeerAuthentication, Status) {
    let mut p = Problems::default();
    let (ns, name) = header(obj, "PeerAuthentication", &mut p);
    let key = format!("{ns}/{name}");
    let empty = Yaml::Null;
    let spec = obj.get("spec").unwrap_or(&empty);
    let scope = scope_of(&ns, root_ns, spec, &mut p);
    let mut m = MtlsMode::Unset;
    let mut port_modes = BTreeMap::new();
    for (k, v) in entries(spec, "spec", &mut p) {
        match k.as_str() {
            "selector" => {}
            "mtls" => m = mode(v, "spec.mtls", &mut p),
            "portLevelMtls" => {
                for (port, pm) in entries(v, "spec.portLevelMtls", &mut p) {
                    let at = format!("spec.portLevelMtls.{port}");
                    match parse_port(&port) {
                        Ok(n) => {
                            port_modes.insert(n, mode(pm, &at, &mut p));
                        }
                        Err(e) => p.add(&at, e),
                    }
                }
            }
            _ => p.add(&format!("spec.{k}"), "unknown field"),
        }
    }
    let created = obj
        .get("metadata")
        .and_then(|m| m.get("creationTimestamp"))
        .and_then(Yaml::as_str)
        .unwrap_or("")
        .to_owned();
    let mut status = Status {
        kind: "PeerAuthentication",
        key: key.clone(),
        state: State::Accepted,
        messages: Vec::new(),
    };
    if !p.0.is_empty() {
        status.state = State::Rejected;
        status.messages = p.0;
        status
            .messages
            .push("fails closed: STRICT in its scope".into());
        m = MtlsMode::Strict;
        port_modes.clear();
    }
    (
        PeerAuthentication {
            key: key.clone(),
            scope,
            mode: m,
            port_modes,
            order: (created, key),
        },
        status,
    )
}

#[cfg(test)]
mod tests;
