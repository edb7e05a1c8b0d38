//! The one bounds-checked packet parser shared by the XDP and TC programs.
//!
//! It walks Ethernet, up to two 802.1Q / 802.1ad tags, IPv4 (options sized by IHL)
//! or IPv6 with a bounded walk over extension headers, down to the TCP/UDP
//! destination port. Anything it cannot follow ends in an `Err(Stat)` that the
//! caller counts and passes: the datapath only drops what it fully understood.
//!
//! Every read goes through [`header`], which checks the end of the packet first,
//! in the shape the verifier tracks (`ptr + size <= data_end` on the same pointer).

use core::{mem::size_of, ptr::read_unaligned};

use keyfence_common::{PROTO_TCP, PROTO_UDP, ipv4_mapped, stats::Stat};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers followed before giving up (counted as malformed). Real
/// traffic carries one or two; the bound keeps the verifier's walk finite.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// What the verdict needs from a packet. Addresses are 16 bytes, IPv4 mapped.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Destination port, network byte order.
    pub port: [u8; 2],
    pub proto: u8,
    /// The packet was IPv4 (selects the wildcard listener address).
    pub v4: bool,
}

/// A pointer to `N` bytes at `off` from `data`, or `Truncated` if they are not all
/// inside the packet.
#[inline(always)]
fn header<const N: usize>(data: usize, end: usize, off: usize) -> Result<*const [u8; N], Stat> {
    let start = data + off;
    if start + N > end {
        return Err(Stat::PassTruncated);
    }
    Ok(start as *const [u8; N])
}

#[inline(always)]
fn read<const N: usize>(p: *const [u8; N]) -> [u8; N] {
    // SAFETY: `p` came from `header`, which checked that all N bytes are in the packet.
    #[expect(
        unsafe_code,
        reason = "packet access after the bounds check in `header`"
    )]
    unsafe {
        read_unaligned(p)
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Parse one frame laid out in `[data, end)`.
#[inline(always)]
pub fn parse(data: usize, end: usize) -> Result<Flow, Stat> {
    let eth = read(header::<ETH_HLEN>(data, end, 0)?);
    let mut ethertype = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;

    // Up to two tags: 802.1ad outer + 802.1Q inner, or a single 802.1Q.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = read(header::<VLAN_HLEN>(data, end, off)?);
        ethertype = be16(tag[2], tag[3]);
        off += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let tag = read(header::<VLAN_HLEN>(data, end, off)?);
            ethertype = be16(tag[2], tag[3]);
            off += VLAN_HLEN;
        }
    }

    match ethertype {
        ETH_P_IP => parse_ipv4(data, end, off),
        ETH_P_IPV6 => parse_ipv6(data, end, off),
        _ => Err(Stat::PassNotIp),
    }
}

#[inline(always)]
fn parse_ipv4(data: usize, end: usize, off: usize) -> Result<Flow, Stat> {
    let ip = read(header::<IPV4_MIN_HLEN>(data, end, off)?);
    if ip[0] >> 4 != 4 {
        return Err(Stat::PassMalformed);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Stat::PassMalformed);
    }
    // Options must be present in full before we look past them.
    if data + off + ihl > end {
        return Err(Stat::PassTruncated);
    }
    if be16(ip[6], ip[7]) & 0x1fff != 0 {
        return Err(Stat::PassFragment);
    }
    let proto = ip[9];
    let src = ipv4_mapped([ip[12], ip[13], ip[14], ip[15]]);
    let dst = ipv4_mapped([ip[16], ip[17], ip[18], ip[19]]);
    let port = l4_port(data, end, off + ihl, proto)?;
    Ok(Flow {
        src,
        dst,
        port,
        proto,
        v4: true,
    })
}

#[inline(always)]
fn parse_ipv6(data: usize, end: usize, off: usize) -> Result<Flow, Stat> {
    let ip = read(header::<IPV6_HLEN>(data, end, off)?);
    if ip[0] >> 4 != 6 {
        return Err(Stat::PassMalformed);
    }
    let mut next = ip[6];
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    let mut l4 = off + IPV6_HLEN;

    // One more round than headers: the last one hands over to TCP/UDP.
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = read(header::<8>(data, end, l4)?);
                next = ext[0];
                l4 += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext = read(header::<8>(data, end, l4)?);
                next = ext[0];
                l4 += (usize::from(ext[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext = read(header::<8>(data, end, l4)?);
                if be16(ext[2], ext[3]) >> 3 != 0 {
                    return Err(Stat::PassFragment);
                }
                next = ext[0];
                l4 += 8;
            }
            _ => {
                let port = l4_port(data, end, l4, next)?;
                return Ok(Flow {
                    src,
                    dst,
                    port,
                    proto: next,
                    v4: false,
                });
            }
        }
    }
    Err(Stat::PassMalformed)
}

/// Destination port of a TCP or UDP header at `off` (both keep it at bytes 2..4).
#[inline(always)]
fn l4_port(data: usize, end: usize, off: usize, proto: u8) -> Result<[u8; 2], Stat> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Stat::PassNotTcpUdp);
    }
    let ports = read(header::<4>(data, end, off)?);
    Ok([ports[2], ports[3]])
}

const _: () = assert!(size_of::<Flow>() >= 35);
