//! A minimal nftables netlink client: encode a batch of table/chain/rule messages, send it as one
//! transaction, and dump a table's rules back.
//!
//! Written by hand because no suitable library exists: `rustables` is GPL-3.0, `nftnl` binds the
//! GPL libnftnl C library, and shelling out to `nft` is exactly the node dependency (binary
//! version, JSON support, legacy-vs-nft detection) that Ambit removes. Only the handful of
//! expressions Ambit's rule set uses are implemented. Constants are from
//! `linux/netfilter/nf_tables.h` and `linux/netfilter/nfnetlink.h`.

use std::io;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

// --- netlink / nfnetlink framing ---
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;

// --- message types ---
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;

// --- attributes ---
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

/// Protocol families (`NFPROTO_UNSPEC` in a dump request: every family).
pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

/// Netfilter hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Output = 3,
}

/// The 16-byte general-purpose register used by every rule here.
pub const REG_1: u32 = 1;
const REG_VERDICT: u32 = 0;

/// Meta keys.
pub const META_MARK: u32 = 3;
pub const META_OIFNAME: u32 = 7;
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;
/// Conntrack keys.
pub const CT_DIRECTION: u32 = 1;
pub const CT_MARK: u32 = 3;
/// `IP_CT_DIR_ORIGINAL`: the packet travels in the direction of the connection's first packet.
pub const CT_DIR_ORIGINAL: u8 = 0;
/// Socket keys: `NFT_SOCKET_CGROUPV2` loads the 8-byte id of the socket's cgroup v2 ancestor
/// at the expression's level.
pub const SOCKET_CGROUPV2: u32 = 3;
/// Fib: result "address type" of the lookup, keyed by the destination address.
pub const FIB_RESULT_ADDRTYPE: u32 = 3;
pub const FIB_F_DADDR: u32 = 1 << 1;
/// `RTN_LOCAL`: the address is one of the namespace's own.
pub const RTN_LOCAL: u32 = 2;
/// Payload bases.
pub const PAYLOAD_NETWORK: u32 = 1;
pub const PAYLOAD_TRANSPORT: u32 = 2;

pub const NF_ACCEPT: i32 = 1;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: set by the kernel on a redirect that names a port.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink send failed: {0}")]
    Send(io::Error),
    #[error("netlink receive failed: {0}")]
    Recv(io::Error),
    #[error("the kernel rejected nftables message #{index} ({what}): {source}")]
    Rejected {
        index: usize,
        what: String,
        source: io::Error,
    },
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// One nftables expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    /// Load a meta key into `dreg`.
    Meta { key: u32, dreg: u32 },
    /// Set a meta key from `sreg`.
    MetaSet { key: u32, sreg: u32 },
    /// Load a conntrack key into `dreg`.
    Ct { key: u32, dreg: u32 },
    /// Set a conntrack key from `sreg`.
    CtSet { key: u32, sreg: u32 },
    /// Load `len` bytes at `offset` from a header `base` into `dreg`.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// Compare `sreg` with `data` (equal when `eq`, else not-equal); stop the rule on mismatch.
    Cmp { sreg: u32, eq: bool, data: Vec<u8> },
    /// `dreg = data`.
    Immediate { dreg: u32, data: Vec<u8> },
    /// Verdict (`NF_ACCEPT`, ...).
    Verdict(i32),
    /// Redirect to the local port held (network byte order) in `port_reg`.
    Redir { port_reg: u32 },
    /// Load a socket attribute into `dreg`; for [`SOCKET_CGROUPV2`], the id of the socket's
    /// cgroup ancestor at `level` (counted from the installing process's cgroup namespace root).
    Socket { key: u32, dreg: u32, level: u32 },
    /// `fib daddr type`-style lookup: with `result` = [`FIB_RESULT_ADDRTYPE`] and `flags` =
    /// [`FIB_F_DADDR`], loads the route type (`RTN_LOCAL`, ...) of the destination address.
    Fib { result: u32, flags: u32, dreg: u32 },
    /// An expression read back from the kernel that this module does not model (by name, or
    /// a known name with attributes it does not expect). Never equal to an expression Ambit
    /// installs, so a rule holding one fails verification.
    Other(String),
}

/// A rule to append to a chain; `tag` is stored as rule user data and read back by [`dump_rules`].
#[derive(Clone, Debug)]
pub struct Rule {
    pub chain: String,
    pub exprs: Vec<Expr>,
    pub tag: Vec<u8>,
}

/// A base chain.
#[derive(Clone, Debug)]
pub struct Chain {
    pub name: String,
    pub kind: &'static str,
    pub hook: Hook,
    pub priority: i32,
}

/// A rule read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedRule {
    pub chain: String,
    pub tag: Vec<u8>,
    /// The rule's expressions as the kernel holds them.
    pub exprs: Vec<Expr>,
}

/// A chain read back from the kernel (`hook` is `None` for a regular, non-base chain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedChain {
    pub family: u8,
    pub table: String,
    pub name: String,
    /// (hook number, priority) of a base chain.
    pub hook: Option<(u32, i32)>,
    /// `filter`, `nat` or `route` for a base chain.
    pub kind: Option<String>,
}

// === encoding ===

struct Writer {
    buf: Vec<u8>,
    seq: u32,
    /// Human description of each message that asks for an ack, in order.
    acked: Vec<(u32, String)>,
}

impl Writer {
    fn new(seq: u32) -> Self {
        Self {
            buf: Vec::with_capacity(4096),
            seq,
            acked: Vec::new(),
        }
    }

    fn begin(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in end()
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel
        // struct nfgenmsg
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.seq += 1;
        start
    }

    fn end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn nft_msg(&mut self, msg: u16, flags: u16, family: u8, what: String) -> usize {
        self.acked.push((self.seq, what));
        self.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            family,
            0,
        )
    }

    fn expr(&mut self, e: &Expr) {
        let elem = self.nest(NFTA_LIST_ELEM);
        let (name, body): (&str, Vec<(u16, Attr)>) = match e {
            Expr::Meta { key, dreg } => ("meta", vec![(2, Attr::U32(*key)), (1, Attr::U32(*dreg))]),
            Expr::MetaSet { key, sreg } => {
                ("meta", vec![(2, Attr::U32(*key)), (3, Attr::U32(*sreg))])
            }
            Expr::Ct { key, dreg } => ("ct", vec![(2, Attr::U32(*key)), (1, Attr::U32(*dreg))]),
            Expr::CtSet { key, sreg } => ("ct", vec![(2, Attr::U32(*key)), (4, Attr::U32(*sreg))]),
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => (
                "payload",
                vec![
                    (1, Attr::U32(*dreg)),
                    (2, Attr::U32(*base)),
                    (3, Attr::U32(*offset)),
                    (4, Attr::U32(*len)),
                ],
            ),
            Expr::Cmp { sreg, eq, data } => (
                "cmp",
                vec![
                    (1, Attr::U32(*sreg)),
                    (2, Attr::U32(if *eq { 0 } else { 1 })),
                    (3, Attr::Value(data.clone())),
                ],
            ),
            Expr::Immediate { dreg, data } => (
                "immediate",
                vec![(1, Attr::U32(*dreg)), (2, Attr::Value(data.clone()))],
            ),
            Expr::Verdict(code) => (
                "immediate",
                vec![(1, Attr::U32(REG_VERDICT)), (2, Attr::Verdict(*code))],
            ),
            Expr::Redir { port_reg } => ("redir", vec![(1, Attr::U32(*port_reg))]),
            Expr::Socket { key, dreg, level } => (
                "socket",
                vec![
                    (1, Attr::U32(*key)),
                    (2, Attr::U32(*dreg)),
                    (3, Attr::U32(*level)),
                ],
            ),
            Expr::Fib {
                result,
                flags,
                dreg,
            } => (
                "fib",
                vec![
                    (1, Attr::U32(*dreg)),
                    (2, Attr::U32(*result)),
                    (3, Attr::U32(*flags)),
                ],
            ),
            // Only ever read back; the kernel rejects an expression without attributes.
            Expr::Other(name) => (name.as_str(), Vec::new()),
        };
        self.attr_str(NFTA_EXPR_NAME, name);
        let data = self.nest(NFTA_EXPR_DATA);
        for (ty, a) in body {
            match a {
                Attr::U32(v) => self.attr_u32(ty, v),
                Attr::Value(v) => {
                    let n = self.nest(ty);
                    self.attr(NFTA_DATA_VALUE, &v);
                    self.nest_end(n);
                }
                Attr::Verdict(code) => {
                    let n = self.nest(ty);
                    let v = self.nest(NFTA_DATA_VERDICT);
                    self.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
                    self.nest_end(v);
                    self.nest_end(n);
                }
            }
        }
        self.nest_end(data);
        self.nest_end(elem);
    }
}

enum Attr {
    U32(u32),
    Value(Vec<u8>),
    Verdict(i32),
}

/// A transaction: every message is applied by the kernel atomically, or none is.
pub struct Batch {
    w: Writer,
}

impl Batch {
    pub fn new() -> Self {
        let mut w = Writer::new(1);
        let b = w.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        w.end(b);
        Self { w }
    }

    /// Creates the table if missing (never fails on an existing one).
    pub fn ensure_table(&mut self, family: u8, table: &str) {
        let m = self.w.nft_msg(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            family,
            format!("ensure table {table}"),
        );
        self.w.attr_str(NFTA_TABLE_NAME, table);
        self.w.end(m);
    }

    /// Deletes the table with everything in it.
    pub fn delete_table(&mut self, family: u8, table: &str) {
        let m = self
            .w
            .nft_msg(NFT_MSG_DELTABLE, 0, family, format!("delete table {table}"));
        self.w.attr_str(NFTA_TABLE_NAME, table);
        self.w.end(m);
    }

    pub fn add_chain(&mut self, family: u8, table: &str, chain: &Chain) {
        let m = self.w.nft_msg(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            family,
            format!("add chain {}", chain.name),
        );
        self.w.attr_str(NFTA_CHAIN_TABLE, table);
        self.w.attr_str(NFTA_CHAIN_NAME, &chain.name);
        let h = self.w.nest(NFTA_CHAIN_HOOK);
        self.w.attr_u32(NFTA_HOOK_HOOKNUM, chain.hook as u32);
        self.w.attr_u32(NFTA_HOOK_PRIORITY, chain.priority as u32);
        self.w.nest_end(h);
        self.w.attr_u32(NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
        self.w.attr_str(NFTA_CHAIN_TYPE, chain.kind);
        self.w.end(m);
    }

    pub fn add_rule(&mut self, family: u8, table: &str, rule: &Rule) {
        let m = self.w.nft_msg(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            family,
            format!("add rule to {}", rule.chain),
        );
        self.w.attr_str(NFTA_RULE_TABLE, table);
        self.w.attr_str(NFTA_RULE_CHAIN, &rule.chain);
        let list = self.w.nest(NFTA_RULE_EXPRESSIONS);
        for e in &rule.exprs {
            self.w.expr(e);
        }
        self.w.nest_end(list);
        self.w.attr(NFTA_RULE_USERDATA, &rule.tag);
        self.w.end(m);
    }

    /// Finishes the batch and returns the bytes plus the acked messages' (seq, description).
    fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>) {
        let e = self
            .w
            .begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.w.end(e);
        (self.w.buf, self.w.acked)
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

// === socket ===

/// A netfilter netlink socket. It belongs to the network namespace in which it was opened:
/// open it inside the target namespace (see `Netns::run`), use it anywhere.
pub struct NftSocket {
    sock: Socket,
}

impl NftSocket {
    pub fn open() -> Result<Self, Error> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(Error::Socket)?;
        sock.bind_auto().map_err(Error::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(Error::Socket)?;
        set_recv_timeout(&sock, Duration::from_secs(5)).map_err(Error::Socket)?;
        Ok(Self { sock })
    }

    /// Sends the batch and waits for the kernel's verdict on every message.
    pub fn apply(&self, batch: Batch) -> Result<(), Error> {
        let (buf, acked) = batch.finish();
        self.sock.send(&buf, 0).map_err(Error::Send)?;
        let mut pending: Vec<u32> = acked.iter().map(|(s, _)| *s).collect();
        let mut rx = vec![0u8; 65536];
        while !pending.is_empty() {
            let n = self.sock.recv(&mut &mut rx[..], 0).map_err(Error::Recv)?;
            for msg in Messages::new(&rx[..n]) {
                let msg = msg?;
                if msg.ty != NLMSG_ERROR {
                    continue;
                }
                let code = msg
                    .payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                    .ok_or(Error::Malformed("short error message"))?;
                pending.retain(|s| *s != msg.seq);
                if code != 0 {
                    let index = acked.iter().position(|(s, _)| *s == msg.seq).unwrap_or(0);
                    return Err(Error::Rejected {
                        index,
                        what: acked.get(index).map(|a| a.1.clone()).unwrap_or_default(),
                        source: io::Error::from_raw_os_error(-code),
                    });
                }
            }
        }
        Ok(())
    }

    /// Dumps the rules of `table` (chain name, user-data tag and expressions, in kernel
    /// order). A missing table yields `Ok(None)`.
    pub fn dump_rules(&self, family: u8, table: &str) -> Result<Option<Vec<DumpedRule>>, Error> {
        self.dump(NFT_MSG_GETRULE, family, Some(table), parse_rule)
    }

    /// Dumps every chain of every table of `family` (`NFPROTO_UNSPEC`: all families) in the
    /// socket's namespace.
    pub fn dump_chains(&self, family: u8) -> Result<Vec<DumpedChain>, Error> {
        Ok(self
            .dump(NFT_MSG_GETCHAIN, family, None, parse_chain)?
            .unwrap_or_default())
    }

    fn dump<T>(
        &self,
        msg_type: u16,
        family: u8,
        table: Option<&str>,
        parse: fn(&[u8]) -> Result<T, Error>,
    ) -> Result<Option<Vec<T>>, Error> {
        let mut w = Writer::new(1);
        let m = w.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            0,
        );
        if let Some(t) = table {
            w.attr_str(NFTA_RULE_TABLE, t);
        }
        w.end(m);
        self.sock.send(&w.buf, 0).map_err(Error::Send)?;
        // A reply to a dump of GETRULE/GETCHAIN is a NEWRULE/NEWCHAIN message per object.
        let reply = (NFNL_SUBSYS_NFTABLES << 8) | (msg_type - 1);
        let mut out = Vec::new();
        let mut rx = vec![0u8; 65536];
        loop {
            let n = self.sock.recv(&mut &mut rx[..], 0).map_err(Error::Recv)?;
            for msg in Messages::new(&rx[..n]) {
                let msg = msg?;
                match msg.ty {
                    NLMSG_DONE => return Ok(Some(out)),
                    NLMSG_ERROR => {
                        let code = msg
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                            .ok_or(Error::Malformed("short error message"))?;
                        if code == -libc::ENOENT {
                            return Ok(None);
                        }
                        if code != 0 {
                            return Err(Error::Rejected {
                                index: 0,
                                what: format!("dump of {}", table.unwrap_or("every table")),
                                source: io::Error::from_raw_os_error(-code),
                            });
                        }
                    }
                    t if t == reply => out.push(parse(msg.payload)?),
                    _ => {}
                }
            }
        }
    }
}

fn set_recv_timeout(sock: &Socket, d: Duration) -> io::Result<()> {
    use std::os::fd::AsFd;
    let tv = nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _);
    nix::sys::socket::setsockopt(
        &sock.as_fd(),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &tv,
    )
    .map_err(io::Error::from)
}

// === decoding ===

struct Msg<'a> {
    ty: u16,
    seq: u32,
    /// Bytes after the netlink header.
    payload: &'a [u8],
}

struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Msg<'a>, Error>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(self.buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > self.buf.len() {
            self.buf = &[];
            return Some(Err(Error::Malformed("bad netlink message length")));
        }
        let ty = u16::from_ne_bytes(self.buf[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(self.buf[8..12].try_into().ok()?);
        let payload = &self.buf[NLMSG_HDRLEN..len];
        let aligned = (len + 3) & !3;
        self.buf = self.buf.get(aligned..).unwrap_or(&[]);
        Some(Ok(Msg { ty, seq, payload }))
    }
}

/// Iterates the (type without flags, value) attributes of `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let val = &buf[4..len];
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
        Some((ty, val))
    })
}

fn cstr(val: &[u8]) -> String {
    String::from_utf8_lossy(val.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
}

fn be_u32(val: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(val.get(..4)?.try_into().ok()?))
}

fn parse_rule(payload: &[u8]) -> Result<DumpedRule, Error> {
    // Skip struct nfgenmsg (4 bytes).
    let body = payload
        .get(4..)
        .ok_or(Error::Malformed("short rule message"))?;
    let mut chain = None;
    let mut tag = Vec::new();
    let mut exprs = Vec::new();
    for (ty, val) in attrs(body) {
        match ty {
            NFTA_RULE_CHAIN => chain = Some(cstr(val)),
            NFTA_RULE_USERDATA => tag = val.to_vec(),
            NFTA_RULE_EXPRESSIONS => {
                exprs = attrs(val)
                    .filter(|(t, _)| *t == NFTA_LIST_ELEM)
                    .map(|(_, e)| parse_expr(e))
                    .collect();
            }
            _ => {}
        }
    }
    Ok(DumpedRule {
        chain: chain.ok_or(Error::Malformed("rule without chain"))?,
        tag,
        exprs,
    })
}

fn parse_chain(payload: &[u8]) -> Result<DumpedChain, Error> {
    let family = *payload
        .first()
        .ok_or(Error::Malformed("short chain message"))?;
    let body = payload
        .get(4..)
        .ok_or(Error::Malformed("short chain message"))?;
    let (mut table, mut name, mut hook, mut kind) = (None, None, None, None);
    for (ty, val) in attrs(body) {
        match ty {
            NFTA_CHAIN_TABLE => table = Some(cstr(val)),
            NFTA_CHAIN_NAME => name = Some(cstr(val)),
            NFTA_CHAIN_TYPE => kind = Some(cstr(val)),
            NFTA_CHAIN_HOOK => {
                let (mut num, mut prio) = (None, None);
                for (t, v) in attrs(val) {
                    match t {
                        NFTA_HOOK_HOOKNUM => num = be_u32(v),
                        NFTA_HOOK_PRIORITY => prio = be_u32(v).map(|p| p as i32),
                        _ => {}
                    }
                }
                hook = num.zip(prio);
            }
            _ => {}
        }
    }
    Ok(DumpedChain {
        family,
        table: table.ok_or(Error::Malformed("chain without table"))?,
        name: name.ok_or(Error::Malformed("chain without name"))?,
        hook,
        kind,
    })
}

/// Decodes one expression as the kernel dumps it: the attributes are read by type, not by
/// position; an attribute this module does not model turns the expression into
/// [`Expr::Other`], so a rule with an unexpected expression never compares equal.
fn parse_expr(elem: &[u8]) -> Expr {
    let mut name = String::new();
    let mut data: &[u8] = &[];
    for (ty, val) in attrs(elem) {
        match ty {
            NFTA_EXPR_NAME => name = cstr(val),
            NFTA_EXPR_DATA => data = val,
            _ => {}
        }
    }
    let mut u32s: Vec<(u16, u32)> = Vec::new();
    let mut value: Option<Vec<u8>> = None;
    let mut verdict: Option<i32> = None;
    for (ty, val) in attrs(data) {
        // Nested data (cmp's NFTA_CMP_DATA = 3, immediate's NFTA_IMMEDIATE_DATA = 2).
        let nested: Vec<(u16, &[u8])> = attrs(val).collect();
        match (name.as_str(), ty) {
            ("cmp", 3) | ("immediate", 2) => {
                for (t, v) in nested {
                    match t {
                        NFTA_DATA_VALUE => value = Some(v.to_vec()),
                        NFTA_DATA_VERDICT => {
                            verdict = attrs(v)
                                .find(|(t, _)| *t == NFTA_VERDICT_CODE)
                                .and_then(|(_, c)| be_u32(c))
                                .map(|c| c as i32);
                        }
                        _ => {}
                    }
                }
            }
            _ => match be_u32(val) {
                Some(v) if val.len() == 4 => u32s.push((ty, v)),
                _ => return Expr::Other(name),
            },
        }
    }
    let get = |t: u16| u32s.iter().find(|(ty, _)| *ty == t).map(|(_, v)| *v);
    let only = |allowed: &[u16]| u32s.iter().all(|(t, _)| allowed.contains(t));
    let other = || Expr::Other(name.clone());
    match name.as_str() {
        "meta" if only(&[1, 2]) => match (get(2), get(1)) {
            (Some(key), Some(dreg)) => Expr::Meta { key, dreg },
            _ => other(),
        },
        "meta" if only(&[2, 3]) => match (get(2), get(3)) {
            (Some(key), Some(sreg)) => Expr::MetaSet { key, sreg },
            _ => other(),
        },
        "ct" if only(&[1, 2]) => match (get(2), get(1)) {
            (Some(key), Some(dreg)) => Expr::Ct { key, dreg },
            _ => other(),
        },
        "ct" if only(&[2, 4]) => match (get(2), get(4)) {
            (Some(key), Some(sreg)) => Expr::CtSet { key, sreg },
            _ => other(),
        },
        "payload" if only(&[1, 2, 3, 4]) => match (get(2), get(3), get(4), get(1)) {
            (Some(base), Some(offset), Some(len), Some(dreg)) => Expr::Payload {
                base,
                offset,
                len,
                dreg,
            },
            _ => other(),
        },
        "cmp" if only(&[1, 2]) => match (get(1), get(2), value) {
            (Some(sreg), Some(op @ (0 | 1)), Some(data)) => Expr::Cmp {
                sreg,
                eq: op == 0,
                data,
            },
            _ => other(),
        },
        "immediate" if only(&[1]) => match (get(1), value, verdict) {
            (Some(REG_VERDICT), None, Some(code)) => Expr::Verdict(code),
            (Some(dreg), Some(data), None) if dreg != REG_VERDICT => Expr::Immediate { dreg, data },
            _ => other(),
        },
        // The kernel reports the max register (= min when none was given) and the
        // "proto specified" flag that a port register implies.
        "redir" if only(&[1, 2, 3]) => match (get(1), get(2), get(3)) {
            (Some(min), Some(max), Some(NF_NAT_RANGE_PROTO_SPECIFIED)) if min == max => {
                Expr::Redir { port_reg: min }
            }
            _ => other(),
        },
        "fib" if only(&[1, 2, 3]) => match (get(2), get(3), get(1)) {
            (Some(result), Some(flags), Some(dreg)) => Expr::Fib {
                result,
                flags,
                dreg,
            },
            _ => other(),
        },
        "socket" if only(&[1, 2, 3]) => match (get(1), get(2), get(3)) {
            (Some(key), Some(dreg), Some(level)) => Expr::Socket { key, dreg, level },
            _ => other(),
        },
        _ => other(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested() {
        let mut w = Writer::new(7);
        let m = w.nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, NFPROTO_INET, "t".into());
        w.attr_str(NFTA_TABLE_NAME, "ambit");
        w.end(m);
        // header 16 + nfgenmsg 4 + attr (4 + "ambit\0" = 10, padded to 12)
        assert_eq!(w.buf.len(), 32);
        assert_eq!(u32::from_ne_bytes(w.buf[0..4].try_into().unwrap()), 32);
        let got: Vec<_> = attrs(&w.buf[20..]).collect();
        assert_eq!(got, vec![(NFTA_TABLE_NAME, &b"ambit\0"[..])]);
        assert_eq!(w.acked, vec![(7, "t".to_string())]);
    }

    #[test]
    fn truncated_replies_are_reported_not_panicked() {
        let mut bad = vec![0u8; 20];
        bad[0..4].copy_from_slice(&200u32.to_ne_bytes());
        let r: Vec<_> = Messages::new(&bad).collect();
        assert!(matches!(r.as_slice(), [Err(Error::Malformed(_))]));
        assert!(parse_rule(&[1, 2]).is_err());
    }
}
