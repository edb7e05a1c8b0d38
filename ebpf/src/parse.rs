//! The one bounds-checked packet parser shared by the XDP and TC programs.
//!
//! It walks Ethernet, up to two 802.1Q / 802.1ad tags, IPv4 (options sized by IHL)
//! or IPv6 with a bounded walk over extension headers, down to the TCP/UDP
//! destination port. Anything it cannot follow ends in an [`Unparsed`] that the
//! caller counts and passes: the datapath only drops what it fully understood,
//! except that with `datapath.unparsed: drop` a packet whose IP header was read
//! but whose transport header was not is dropped on protected addresses (see
//! `verdict::judge`).
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
/// traffic carries one or two, Linux follows any number. The walk stays a loop
/// (LLVM does not unroll it), so the verifier's work grows with the depth but
/// the program does not: measured on 6.18 (`prog_fixtures::verifier_cost`),
/// XDP verifies 7.3k instructions at depth 6, 16.8k at 16, 26k at 32, 30.6k at
/// 64 (where [`MAX_L4_OFFSET`] binds first), against a 1M limit. 32 leaves a
/// wide margin for older verifiers (Debian 12's 6.1; bounded loops since 5.3).
pub const MAX_IPV6_EXT_HEADERS: usize = 32;
/// The transport header must start within this many bytes of the frame; past
/// it the chain counts as malformed like one that is too deep. It bounds the
/// offset the verifier tracks (each header may add 2 KiB; packet offsets must
/// stay below 64 KiB) and is what the TC program makes linear
/// (`TC_PULL_BYTES`), so XDP and TC see the same packets the same way. 32
/// minimal headers after two VLAN tags end at byte 318.
pub const MAX_L4_OFFSET: usize = 508;

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

/// Why a packet could not be parsed.
#[derive(Clone, Copy)]
pub struct Unparsed {
    pub stat: Stat,
    /// Set when the IP header was read but the transport header was out of
    /// reach: extension chain too long or truncated, transport header
    /// truncated. Never for what the datapath always passes: not IP, a bad IP
    /// header, a non-first fragment, a protocol other than TCP and UDP.
    pub unreached: Option<IpHeader>,
}

/// Where the IP header of an unparsed packet is, to read its addresses again
/// ([`addresses`]) on that rare path: carrying them out of the parser instead
/// makes LLVM keep every address byte in its own register on the hot path,
/// past the 512-byte BPF stack.
#[derive(Clone, Copy)]
pub struct IpHeader {
    pub off: usize,
    pub v4: bool,
}

impl From<Stat> for Unparsed {
    #[inline(always)]
    fn from(stat: Stat) -> Self {
        Self {
            stat,
            unreached: None,
        }
    }
}

/// The failure `stat` of a packet whose transport header was out of reach.
#[inline(always)]
fn unreached(stat: Stat, off: usize, v4: bool) -> Unparsed {
    Unparsed {
        stat,
        unreached: Some(IpHeader { off, v4 }),
    }
}

/// The addresses of the IP header at `ip` (port 0, protocol 0), for a packet
/// the parser gave up on after reading that header.
#[inline(always)]
pub fn addresses(data: usize, end: usize, ip: IpHeader) -> Option<Flow> {
    // The offset was checked once already; the verifier needs it bounded again.
    if ip.off > MAX_L4_OFFSET {
        return None;
    }
    let (src, dst) = if ip.v4 {
        let h = header::<IPV4_MIN_HLEN>(data, end, ip.off).ok()?;
        (
            ipv4_mapped(field::<IPV4_MIN_HLEN, 12, 4>(h)),
            ipv4_mapped(field::<IPV4_MIN_HLEN, 16, 4>(h)),
        )
    } else {
        let h = header::<IPV6_HLEN>(data, end, ip.off).ok()?;
        (field::<IPV6_HLEN, 8, 16>(h), field::<IPV6_HLEN, 24, 16>(h))
    };
    Some(Flow {
        src,
        dst,
        port: [0; 2],
        proto: 0,
        v4: ip.v4,
    })
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

/// Byte `I` of the `N` checked bytes at `p`, straight into a register rather
/// than a copy of the header on the (512-byte) BPF stack.
#[inline(always)]
fn byte<const N: usize, const I: usize>(p: *const [u8; N]) -> u8 {
    const { assert!(I < N) };
    // SAFETY: `p` came from `header`, which checked that all N bytes are in
    // the packet, and I < N.
    #[expect(
        unsafe_code,
        reason = "packet access after the bounds check in `header`"
    )]
    unsafe {
        p.cast::<u8>().add(I).read()
    }
}

/// Bytes `AT..AT + M` of the `N` checked bytes at `p`, copied from the packet
/// to where the caller stores them (the flow), not through registers.
#[inline(always)]
fn field<const N: usize, const AT: usize, const M: usize>(p: *const [u8; N]) -> [u8; M] {
    const { assert!(AT + M <= N) };
    // SAFETY: `p` came from `header`, which checked that all N bytes are in
    // the packet, and AT + M <= N.
    #[expect(
        unsafe_code,
        reason = "packet access after the bounds check in `header`"
    )]
    unsafe {
        read_unaligned(p.cast::<u8>().add(AT).cast::<[u8; M]>())
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Parse one frame laid out in `[data, end)`.
#[inline(always)]
pub fn parse(data: usize, end: usize) -> Result<Flow, Unparsed> {
    let eth = header::<ETH_HLEN>(data, end, 0)?;
    let mut ethertype = be16(byte::<ETH_HLEN, 12>(eth), byte::<ETH_HLEN, 13>(eth));
    let mut off = ETH_HLEN;

    // Up to two tags: 802.1ad outer + 802.1Q inner, or a single 802.1Q.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = header::<VLAN_HLEN>(data, end, off)?;
        ethertype = be16(byte::<VLAN_HLEN, 2>(tag), byte::<VLAN_HLEN, 3>(tag));
        off += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let tag = header::<VLAN_HLEN>(data, end, off)?;
            ethertype = be16(byte::<VLAN_HLEN, 2>(tag), byte::<VLAN_HLEN, 3>(tag));
            off += VLAN_HLEN;
        }
    }

    match ethertype {
        ETH_P_IP => parse_ipv4(data, end, off),
        ETH_P_IPV6 => parse_ipv6(data, end, off),
        _ => Err(Stat::PassNotIp.into()),
    }
}

#[inline(always)]
fn parse_ipv4(data: usize, end: usize, off: usize) -> Result<Flow, Unparsed> {
    let ip = header::<IPV4_MIN_HLEN>(data, end, off)?;
    let version_ihl = byte::<IPV4_MIN_HLEN, 0>(ip);
    if version_ihl >> 4 != 4 {
        return Err(Stat::PassMalformed.into());
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Stat::PassMalformed.into());
    }
    // Options must be present in full before we look past them.
    if data + off + ihl > end {
        return Err(Stat::PassTruncated.into());
    }
    if be16(byte::<IPV4_MIN_HLEN, 6>(ip), byte::<IPV4_MIN_HLEN, 7>(ip)) & 0x1fff != 0 {
        return Err(Stat::PassFragment.into());
    }
    let proto = byte::<IPV4_MIN_HLEN, 9>(ip);
    let port = transport(data, end, off + ihl, proto, IpHeader { off, v4: true })?;
    Ok(Flow {
        src: ipv4_mapped(field::<IPV4_MIN_HLEN, 12, 4>(ip)),
        dst: ipv4_mapped(field::<IPV4_MIN_HLEN, 16, 4>(ip)),
        port,
        proto,
        v4: true,
    })
}

#[inline(always)]
const fn is_extension(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    )
}

#[inline(always)]
fn parse_ipv6(data: usize, end: usize, off: usize) -> Result<Flow, Unparsed> {
    let ip = header::<IPV6_HLEN>(data, end, off)?;
    if byte::<IPV6_HLEN, 0>(ip) >> 4 != 6 {
        return Err(Stat::PassMalformed.into());
    }
    let mut next = byte::<IPV6_HLEN, 6>(ip);
    let mut l4 = off + IPV6_HLEN;

    // The walk only moves `l4` and `next`; the transport header is read once,
    // after it, so the verifier checks the rest of the program once per exit
    // of the loop rather than once per header kind and depth.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if !is_extension(next) {
            break;
        }
        if l4 > MAX_L4_OFFSET {
            return Err(unreached(Stat::PassMalformed, off, false));
        }
        // Every extension header is at least 8 bytes long.
        let Ok(ext) = header::<8>(data, end, l4) else {
            return Err(unreached(Stat::PassTruncated, off, false));
        };
        l4 += match next {
            NEXTHDR_AUTH => (usize::from(byte::<8, 1>(ext)) + 2) * 4,
            NEXTHDR_FRAGMENT => {
                if be16(byte::<8, 2>(ext), byte::<8, 3>(ext)) >> 3 != 0 {
                    return Err(Stat::PassFragment.into());
                }
                8
            }
            _ => (usize::from(byte::<8, 1>(ext)) + 1) * 8,
        };
        next = byte::<8, 0>(ext);
    }
    if is_extension(next) || l4 > MAX_L4_OFFSET {
        return Err(unreached(Stat::PassMalformed, off, false));
    }
    let port = transport(data, end, l4, next, IpHeader { off, v4: false })?;
    Ok(Flow {
        src: field::<IPV6_HLEN, 8, 16>(ip),
        dst: field::<IPV6_HLEN, 24, 16>(ip),
        port,
        proto: next,
        v4: false,
    })
}

/// The destination port of a `proto` header at `off`; a truncated one leaves
/// the packet unreached (the IP header is at `ip`).
#[inline(always)]
fn transport(
    data: usize,
    end: usize,
    off: usize,
    proto: u8,
    ip: IpHeader,
) -> Result<[u8; 2], Unparsed> {
    match l4_port(data, end, off, proto) {
        Ok(port) => Ok(port),
        Err(Stat::PassTruncated) => Err(Unparsed {
            stat: Stat::PassTruncated,
            unreached: Some(ip),
        }),
        Err(stat) => Err(stat.into()),
    }
}

/// Destination port of a TCP or UDP header at `off` (both keep it at bytes 2..4).
#[inline(always)]
fn l4_port(data: usize, end: usize, off: usize, proto: u8) -> Result<[u8; 2], Stat> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Stat::PassNotTcpUdp);
    }
    Ok(field::<4, 2, 2>(header::<4>(data, end, off)?))
}

const _: () = assert!(size_of::<Flow>() >= 35);
