//! Reading what tcpdump captured: a minimal pcap reader (Ethernet, Linux "cooked" v1 and v2
//! link types), TCP flows reassembled by sequence number, and a TLS record walker.
//!
//! Hand-written because the test needs only these few formats and must not depend on a
//! dissector's version (tshark is not on a fresh machine, and its output format drifts).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, bail, ensure};

/// One TCP segment as captured.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    /// The SYN flag: its sequence number is the flow's initial one.
    pub syn: bool,
    pub payload: Vec<u8>,
}

fn u16be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32be(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The IP packet inside a link-layer frame, with its ethertype.
fn network(linktype: u32, frame: &[u8]) -> Option<(u16, &[u8])> {
    match linktype {
        1 => Some((u16be(frame, 12)?, frame.get(14..)?)),
        113 => Some((u16be(frame, 14)?, frame.get(16..)?)),
        276 => Some((u16be(frame, 0)?, frame.get(20..)?)),
        _ => None,
    }
}

fn tcp_segment(ethertype: u16, ip: &[u8]) -> Option<Segment> {
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if *ip.get(9)? != 6 {
                return None;
            }
            let total = usize::from(u16be(ip, 2)?).min(ip.len());
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                IpAddr::V4(Ipv4Addr::from(s)),
                IpAddr::V4(Ipv4Addr::from(d)),
                ip.get(ihl..total)?,
            )
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let len = usize::from(u16be(ip, 4)?);
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                ip.get(40..(40 + len).min(ip.len()))?,
            )
        }
        _ => return None,
    };
    let off = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src, u16be(tcp, 0)?),
        dst: SocketAddr::new(dst, u16be(tcp, 2)?),
        seq: u32be(tcp, 4)?,
        syn: tcp.get(13)? & 0x02 != 0,
        payload: tcp.get(off..)?.to_vec(),
    })
}

/// Every TCP segment of a pcap file (IPv4 and IPv6).
pub fn tcp_segments(file: &[u8]) -> Result<Vec<Segment>> {
    ensure!(file.len() >= 24, "pcap file too short");
    let magic = u32::from_le_bytes(file[0..4].try_into()?);
    ensure!(
        magic == 0xa1b2c3d4 || magic == 0xa1b23c4d,
        "not a little-endian pcap file (magic {magic:#x})"
    );
    let linktype = u32::from_le_bytes(file[20..24].try_into()?);
    if ![1, 113, 276].contains(&linktype) {
        bail!("unsupported link type {linktype}");
    }
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let caplen = u32::from_le_bytes(file[at + 8..at + 12].try_into()?) as usize;
        let frame = file
            .get(at + 16..at + 16 + caplen)
            .ok_or_else(|| anyhow::anyhow!("truncated packet record"))?;
        if let Some((et, ip)) = network(linktype, frame)
            && let Some(seg) = tcp_segment(et, ip)
        {
            out.push(seg);
        }
        at += 16 + caplen;
    }
    Ok(out)
}

/// The byte stream of each direction of each flow, from its first data byte (after the SYN,
/// or, if the SYN was not captured, from the earliest captured data byte) up to the first gap.
/// A packet seen on several interfaces (veth, bridge) counts once.
///
/// Segments are ordered by their offset from that start, not by raw sequence number: a
/// flow's sequence numbers start anywhere in 2^32 and wrap, and ordering them raw put the
/// wrapped tail first (a flaky "not a TLS record at offset 0").
pub fn streams(segments: &[Segment]) -> HashMap<(SocketAddr, SocketAddr), Vec<u8>> {
    let mut start: HashMap<(SocketAddr, SocketAddr), u32> = HashMap::new();
    for s in segments.iter().filter(|s| s.syn) {
        start.insert((s.src, s.dst), s.seq.wrapping_add(1));
    }
    // No SYN: the earliest data segment, earliest in sequence space relative to the first
    // one captured (within 2^31 either way, as TCP's own comparisons).
    let mut earliest: HashMap<(SocketAddr, SocketAddr), (u32, i32)> = HashMap::new();
    for s in segments.iter().filter(|s| !s.payload.is_empty()) {
        let (first, min) = earliest.entry((s.src, s.dst)).or_insert((s.seq, 0));
        *min = (*min).min(s.seq.wrapping_sub(*first) as i32);
    }
    for (flow, (first, min)) in earliest {
        start.entry(flow).or_insert(first.wrapping_add(min as u32));
    }
    let mut by_flow: HashMap<(SocketAddr, SocketAddr), BTreeMap<u32, Vec<u8>>> = HashMap::new();
    for s in segments.iter().filter(|s| !s.payload.is_empty()) {
        let flow = (s.src, s.dst);
        let offset = s.seq.wrapping_sub(start[&flow]);
        by_flow
            .entry(flow)
            .or_default()
            .entry(offset)
            .or_insert_with(|| s.payload.clone());
    }
    by_flow
        .into_iter()
        .map(|(flow, segs)| {
            let mut data = Vec::new();
            let mut next: u32 = 0;
            for (offset, payload) in segs {
                // The same bytes may be captured cut differently on different interfaces
                // (offloaded super-segments on a veth, split ones elsewhere): keep what is new.
                // An offset "past 2^31" lies before the start (a retransmission of bytes
                // sent before the capture began): nothing new.
                if offset >= 1 << 31 {
                    continue;
                }
                if offset > next {
                    break; // a gap: stop here
                }
                let skip = (next - offset) as usize;
                if skip >= payload.len() {
                    continue;
                }
                data.extend_from_slice(&payload[skip..]);
                next = offset.wrapping_add(payload.len() as u32);
            }
            (flow, data)
        })
        .collect()
}

/// Walks TLS records over `stream`; returns (records, application-data records), or an error
/// at the first byte that is not a TLS record header. A record cut by the end is allowed.
pub fn tls_records(stream: &[u8]) -> Result<(usize, usize)> {
    let (mut records, mut app) = (0, 0);
    let mut at = 0;
    while at + 5 <= stream.len() {
        let kind = stream[at];
        let version = u16be(stream, at + 1).unwrap_or(0);
        let len = usize::from(u16be(stream, at + 3).unwrap_or(0));
        ensure!(
            matches!(kind, 20..=23) && matches!(version, 0x0301..=0x0303) && len <= (1 << 14) + 256,
            "offset {at}: not a TLS record (type {kind}, version {version:#x}, length {len})"
        );
        records += 1;
        if kind == 23 {
            app += 1;
        }
        at += 5 + len;
    }
    Ok((records, app))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_walker_accepts_records_and_rejects_plaintext() {
        let mut s = vec![22, 3, 1, 0, 2, 1, 2];
        s.extend_from_slice(&[23, 3, 3, 0, 1, 9]);
        assert_eq!(tls_records(&s).unwrap(), (2, 1));
        assert!(tls_records(b"GET / HTTP/1.1\r\n").is_err());
    }

    #[test]
    fn streams_reassemble_in_order_and_stop_at_gaps() {
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:15008".parse().unwrap();
        let seg = |seq, p: &[u8]| Segment {
            src: a,
            dst: b,
            seq,
            syn: false,
            payload: p.to_vec(),
        };
        let s = streams(&[
            seg(13, b"cd"),
            seg(10, b"abc"),
            seg(10, b"abc"),
            seg(20, b"zz"),
        ]);
        assert_eq!(s[&(a, b)], b"abccd");
    }

    #[test]
    fn streams_survive_sequence_numbers_wrapping_past_two_to_the_32() {
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:15008".parse().unwrap();
        let seg = |seq: u32, syn, p: &[u8]| Segment {
            src: a,
            dst: b,
            seq,
            syn,
            payload: p.to_vec(),
        };
        let isn = u32::MAX - 3;
        // Captured out of order, wrapping after "abc", with a copy cut differently.
        let s = streams(&[
            seg(isn, true, b""),
            seg(1, false, b"efg"),
            seg(isn + 1, false, b"abc"),
            seg(0, false, b"de"),
            seg(u32::MAX, false, b"cd"),
        ]);
        assert_eq!(s[&(a, b)], b"abcdefg");
        // Without the SYN, the earliest captured data byte is the start.
        let s = streams(&[seg(1, false, b"z"), seg(u32::MAX, false, b"xy")]);
        assert_eq!(s[&(a, b)], b"xyz");
    }
}
