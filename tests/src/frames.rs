//! Packet builder for datapath fixtures and fuzzing: real, well-formed bytes
//! (checksums left zero: the programs never read them), composable enough to
//! produce every header path the parser walks, and hostile variants of them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const NEXT_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_ESP: u8 = 50;
pub const NEXT_AUTH: u8 = 51;
pub const NEXT_NONE: u8 = 59;
pub const NEXT_DEST: u8 = 60;

/// An IPv6 extension header to put in a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop, routing or destination options: `(kind, length in 8-byte units beyond the first)`.
    Options(u8, u8),
    /// Fragment header with a fragment offset (in 8-byte units) and the M flag.
    Fragment { offset: u16, more: bool },
    /// Authentication header, `len` in 4-byte units minus 2.
    Auth(u8),
}

impl Ext {
    fn kind(&self) -> u8 {
        match self {
            Ext::Options(k, _) => *k,
            Ext::Fragment { .. } => NEXT_FRAGMENT,
            Ext::Auth(_) => NEXT_AUTH,
        }
    }
}

/// The transport part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Any other protocol number with a few payload bytes.
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

impl L4 {
    #[must_use]
    pub fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            L4::Tcp { sport, dport } => {
                let mut h = vec![0u8; 20];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4; // data offset
                h[13] = 0x02; // SYN
                h
            }
            L4::Udp { sport, dport } => {
                let mut h = vec![0u8; 8];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&8u16.to_be_bytes());
                h
            }
            L4::Raw { payload, .. } => payload.clone(),
        }
    }
}

/// Ethernet with `tags` (TPIDs, outermost first) around `ethertype` + `payload`.
#[must_use]
pub fn ethernet(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    for (i, tpid) in tags.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        // The TCI: VLAN id 100 + i.
        f.extend_from_slice(&(100 + u16::try_from(i).unwrap_or(0)).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header with `options` bytes (padded to 4), the flags/fragment
/// field `frag`, `proto`, then `payload`. `version_ihl` overrides byte 0.
#[must_use]
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: usize,
    frag: u16,
    version_ihl: Option<u8>,
    payload: &[u8],
) -> Vec<u8> {
    let opt = options.div_ceil(4) * 4;
    let ihl = u8::try_from((20 + opt) / 4).unwrap_or(15);
    let mut h = vec![0u8; 20 + opt];
    h[0] = version_ihl.unwrap_or(0x40 | ihl);
    let total = u16::try_from(h.len() + payload.len()).unwrap_or(u16::MAX);
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    for b in &mut h[20..] {
        *b = 1; // NOP options
    }
    h.extend_from_slice(payload);
    h
}

/// An IPv6 header, the extension chain `exts`, then `next` + `payload`.
/// `version` overrides the version nibble.
#[must_use]
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    exts: &[Ext],
    next: u8,
    version: Option<u8>,
    payload: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let following = exts.get(i + 1).map_or(next, Ext::kind);
        match ext {
            Ext::Options(_, len) => {
                let mut e = vec![0u8; (usize::from(*len) + 1) * 8];
                e[0] = following;
                e[1] = *len;
                chain.extend_from_slice(&e);
            }
            Ext::Fragment { offset, more } => {
                let mut e = vec![0u8; 8];
                e[0] = following;
                let field = (offset << 3) | u16::from(*more);
                e[2..4].copy_from_slice(&field.to_be_bytes());
                chain.extend_from_slice(&e);
            }
            Ext::Auth(len) => {
                let mut e = vec![0u8; (usize::from(*len) + 2) * 4];
                e[0] = following;
                e[1] = *len;
                chain.extend_from_slice(&e);
            }
        }
    }
    let first = exts.first().map_or(next, Ext::kind);
    let mut h = vec![0u8; 40];
    h[0] = version.unwrap_or(6) << 4;
    let plen = u16::try_from(chain.len() + payload.len()).unwrap_or(u16::MAX);
    h[4..6].copy_from_slice(&plen.to_be_bytes());
    h[6] = first;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(&chain);
    h.extend_from_slice(payload);
    h
}

/// A plain TCP/UDP/other packet between two addresses of one family, with tags.
#[must_use]
pub fn simple(tags: &[u16], src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(
            tags,
            ETH_P_IP,
            &ipv4(s, d, l4.proto(), 0, 0, None, &l4.bytes()),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(
            tags,
            ETH_P_IPV6,
            &ipv6(s, d, &[], l4.proto(), None, &l4.bytes()),
        ),
        (s, d) => panic!("mixed families {s} → {d}"),
    }
}

/// A minimal ARP request.
#[must_use]
pub fn arp() -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[..2].copy_from_slice(&1u16.to_be_bytes());
    p[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[7] = 1;
    ethernet(&[], ETH_P_ARP, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let p = simple(
            &[],
            "192.0.2.10".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            &L4::Tcp {
                sport: 40000,
                dport: 8443,
            },
        );
        assert_eq!(p.len(), 14 + 20 + 20);
        assert_eq!(&p[12..14], &[0x08, 0x00]);
        assert_eq!(p[14], 0x45);
        assert_eq!(&p[34 + 2..34 + 4], &8443u16.to_be_bytes());
        let q = ethernet(&[ETH_P_8021AD, ETH_P_8021Q], ETH_P_IPV6, &[]);
        assert_eq!(q.len(), 14 + 8);
        assert_eq!(&q[20..22], &ETH_P_IPV6.to_be_bytes());
        let v4opt = ipv4(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 6, 5, 0, None, &[]);
        assert_eq!(v4opt.len(), 28);
        assert_eq!(v4opt[0], 0x47);
        let v6 = ipv6(
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
            &[
                Ext::Options(NEXT_HOP, 1),
                Ext::Fragment {
                    offset: 0,
                    more: true,
                },
                Ext::Auth(1),
            ],
            PROTO_UDP,
            None,
            &[],
        );
        assert_eq!(v6.len(), 40 + 16 + 8 + 12);
        assert_eq!(v6[6], NEXT_HOP);
        assert_eq!(v6[40], NEXT_FRAGMENT);
        assert_eq!(v6[56], NEXT_AUTH);
        assert_eq!(v6[64], PROTO_UDP);
    }
}
