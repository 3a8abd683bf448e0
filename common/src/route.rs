//! Policy routing for the source-preserving inbound path, programmed through rtnetlink.
//!
//! The agent delivers inbound connections to the app from the client's own address
//! (IP_TRANSPARENT). The app's replies carry conntrack mark 0x111 (see `redirect`), become
//! fwmark 0x111 in `output-mangle`, and this rule sends them to a table whose default route is
//! `local`, so they come back to the agent's socket instead of leaving the pod:
//!
//! ```text
//! ip rule add fwmark 0x111/0xfff lookup 100 pref 32764       (and -6)
//! ip route add local 0.0.0.0/0 dev lo table 100              (and local ::/0 when lo has IPv6)
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::netns::{self, Netns};
use crate::{CONN_MARK, CONN_MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};

/// Loopback is interface 1 in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rtnetlink {op} failed: {source}")]
    Netlink {
        op: &'static str,
        source: rtnetlink::Error,
    },
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("policy routing is incomplete: {0}")]
    Missing(&'static str),
}

fn nl(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |source| Error::Netlink { op, source }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::ESRCH)
}

/// Whether loopback has IPv6 in the *calling thread's* namespace (call inside `Netns::run`).
pub fn loopback_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn rule_matches(r: &RuleMessage) -> bool {
    let a = &r.attributes;
    a.contains(&RuleAttribute::FwMark(CONN_MARK))
        && (a.contains(&RuleAttribute::Table(ROUTE_TABLE))
            || u32::from(r.header.table) == ROUTE_TABLE)
        && a.contains(&RuleAttribute::Priority(RULE_PRIORITY))
}

fn local_default(v6: bool) -> RouteMessage {
    if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(ROUTE_TABLE)
            .output_interface(LOOPBACK_INDEX)
            .build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(ROUTE_TABLE)
            .output_interface(LOOPBACK_INDEX)
            .build()
    }
}

fn route_matches(r: &RouteMessage) -> bool {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    table == ROUTE_TABLE
        && r.header.kind == RouteType::Local
        && r.header.destination_prefix_length == 0
        && r.attributes.contains(&RouteAttribute::Oif(LOOPBACK_INDEX))
}

async fn has_rule(h: &Handle, v: IpVersion) -> Result<bool, Error> {
    let rules: Vec<RuleMessage> = h
        .rule()
        .get(v)
        .execute()
        .try_collect()
        .await
        .map_err(nl("rule dump"))?;
    Ok(rules.iter().any(rule_matches))
}

async fn has_route(h: &Handle, v6: bool) -> Result<bool, Error> {
    let mut filter = local_default(v6);
    filter
        .attributes
        .retain(|a| matches!(a, RouteAttribute::Table(_)));
    let routes: Vec<RouteMessage> = h
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await
        .map_err(nl("route dump"))?;
    Ok(routes.iter().any(route_matches))
}

/// Adds the rule(s) and route(s); idempotent.
pub async fn install(h: &Handle, ipv6: bool) -> Result<(), Error> {
    for v6 in [false, true] {
        if v6 && !ipv6 {
            continue;
        }
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        if !has_rule(h, version).await? {
            let req = h.rule().add().table_id(ROUTE_TABLE).priority(RULE_PRIORITY);
            let mut req = req.fw_mark(CONN_MARK).action(RuleAction::ToTable);
            req.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(CONN_MARK_MASK));
            if v6 {
                req.message_mut().header.family = AddressFamily::Inet6;
            } else {
                req.message_mut().header.family = AddressFamily::Inet;
            }
            match req.execute().await {
                Err(e) if !is_exists(&e) => return Err(nl("rule add")(e)),
                _ => {}
            }
        }
        h.route()
            .add(local_default(v6))
            .replace()
            .execute()
            .await
            .map_err(nl("route add"))?;
    }
    Ok(())
}

/// Checks that the rule(s) and route(s) are present.
pub async fn verify(h: &Handle, ipv6: bool) -> Result<(), Error> {
    if !has_rule(h, IpVersion::V4).await? {
        return Err(Error::Missing("IPv4 fwmark rule"));
    }
    if !has_route(h, false).await? {
        return Err(Error::Missing("IPv4 local route in table 100"));
    }
    if ipv6 {
        if !has_rule(h, IpVersion::V6).await? {
            return Err(Error::Missing("IPv6 fwmark rule"));
        }
        if !has_route(h, true).await? {
            return Err(Error::Missing("IPv6 local route in table 100"));
        }
    }
    Ok(())
}

/// Removes the rule(s) and route(s); succeeds when they are already gone.
pub async fn remove(h: &Handle) -> Result<(), Error> {
    for version in [IpVersion::V4, IpVersion::V6] {
        let v6 = version == IpVersion::V6;
        let rules: Vec<RuleMessage> = h
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(nl("rule dump"))?;
        for r in rules.into_iter().filter(rule_matches) {
            match h.rule().del(r).execute().await {
                Err(e) if !is_missing(&e) => return Err(nl("rule delete")(e)),
                _ => {}
            }
        }
        match h.route().del(local_default(v6)).execute().await {
            Err(e) if !is_missing(&e) => return Err(nl("route delete")(e)),
            _ => {}
        }
    }
    Ok(())
}

/// A synchronous handle for callers without a runtime (the CNI plugin): an rtnetlink socket
/// opened inside `netns`, driven by a private current-thread runtime.
pub struct RouteCtl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
    ipv6: bool,
}

impl RouteCtl {
    pub fn open_in(netns: &Netns) -> Result<Self, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(Error::Socket)?;
        // The socket is created inside the namespace (synchronously) and used from outside it.
        let (conn, handle, ipv6) = netns
            .run(|| {
                let _enter = rt.enter();
                rtnetlink::new_connection().map(|(c, h, _)| (c, h, loopback_has_ipv6()))
            })?
            .map_err(Error::Socket)?;
        rt.spawn(conn);
        Ok(Self { rt, handle, ipv6 })
    }

    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    pub fn install(&self) -> Result<(), Error> {
        self.rt.block_on(install(&self.handle, self.ipv6))
    }

    pub fn verify(&self) -> Result<(), Error> {
        self.rt.block_on(verify(&self.handle, self.ipv6))
    }

    /// Brings the namespace's loopback up (a namespace made with `ip netns add` starts with it
    /// down; the capture's local routes and the redirect to 127.0.0.1 need it). Idempotent.
    pub fn loopback_up(&self) -> Result<(), Error> {
        self.rt.block_on(async {
            self.handle
                .link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(LOOPBACK_INDEX)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl("link set lo up"))
        })
    }

    pub fn remove(&self) -> Result<(), Error> {
        self.rt.block_on(remove(&self.handle))
    }
}
