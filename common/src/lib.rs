//! Code shared by the CNI plugin (`ambit-cni`) and the node agent (`ambit-agent`).
//!
//! Layout:
//! - [`sys`]: the only module with `unsafe` and namespace switching (setns, ioctl).
//! - [`enrollment`]: which pods are captured: label/annotation names, the decision's terms.
//! - [`netns`]: a verified network-namespace handle and its identity (dev, inode).
//! - [`nft`]: a minimal nftables netlink encoder/decoder (batches, rule dumps).
//! - [`redirect`]: Ambit's in-pod rule set, installed in one atomic nftables transaction.
//! - [`route`]: policy routing for the source-preserving inbound path (rtnetlink).
//! - [`report`]: errors on one line, each cause once.
//! - [`protocol`]: the framed JSON protocol between plugin and agent (netns fd via SCM_RIGHTS).

pub mod enrollment;
pub mod netns;
pub mod nft;
pub mod protocol;
pub mod redirect;
pub mod report;
pub mod route;
pub mod sockmap;
pub mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// Port of the outbound listener inside every captured pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the inbound plaintext listener inside every captured pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Port of the inbound HBONE listener inside every captured pod (never redirected).
pub const INBOUND_HBONE_PORT: u16 = 15008;
/// Conntrack mark of a connection an agent opened to a local address (delivery to the app from
/// the client's address), restored as fwmark on the app's replies.
pub const CONN_MARK: u32 = 0x111;
/// Conntrack mark of any other connection an agent opened inside a pod: not redirected.
pub const AGENT_CONN_MARK: u32 = 0x222;
/// Mask applied to [`CONN_MARK`] in the policy-routing rule.
pub const CONN_MARK_MASK: u32 = 0xfff;
/// Routing table holding the `local` default route for marked replies.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the fwmark policy-routing rule.
pub const RULE_PRIORITY: u32 = 32764;
/// Default agent socket path.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";
