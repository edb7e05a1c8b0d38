//! A userspace reference model of the datapath verdict (SPEC §7), written from
//! the contract over byte slices, independent of the eBPF code: the same packet
//! and the same map contents must give the same `Stat` and listener slot.
//! This file parses the packet; the map lookups are the agent's one model of
//! them, `PolicyTables::decide` (`keyfence::maps::memory`, which the policy
//! writer's unit tests check the writer against).

use std::collections::BTreeSet;

use keyfence::maps::{memory::Flow, policy::PolicyTables};
use keyfence_common::{PROTO_TCP, PROTO_UDP, WILDCARD_V4, WILDCARD_V6, ipv4_mapped, stats::Stat};

/// IPv6 extension headers the datapath follows before calling a chain malformed.
pub const MAX_EXT_HEADERS: usize = 32;
/// The transport header must start within this many bytes of the frame.
pub const MAX_L4_OFFSET: usize = 508;

/// A parse failure: why, and the destination `(address, is IPv4)` when the IP
/// header was read but the transport header was out of reach (the packets
/// `datapath.unparsed: drop` may drop).
struct Failure {
    stat: Stat,
    dst: Option<([u8; 16], bool)>,
}

impl From<Stat> for Failure {
    fn from(stat: Stat) -> Self {
        Self { stat, dst: None }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn take(pkt: &[u8], from: usize, len: usize) -> Result<&[u8], Stat> {
    pkt.get(from..from + len).ok_or(Stat::PassTruncated)
}

fn parse(pkt: &[u8]) -> Result<Flow, Failure> {
    let eth = take(pkt, 0, 14)?;
    let mut ethertype = be16(&eth[12..]);
    let mut off = 14;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        ethertype = be16(&take(pkt, off, 4)?[2..]);
        off += 4;
    }
    match ethertype {
        0x0800 => parse_v4(pkt, off),
        0x86dd => parse_v6(pkt, off),
        _ => Err(Stat::PassNotIp.into()),
    }
}

fn ports(pkt: &[u8], at: usize, proto: u8) -> Result<u16, Stat> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Stat::PassNotTcpUdp);
    }
    Ok(be16(&take(pkt, at, 4)?[2..]))
}

fn parse_v4(pkt: &[u8], off: usize) -> Result<Flow, Failure> {
    let h = take(pkt, off, 20)?;
    if h[0] >> 4 != 4 {
        return Err(Stat::PassMalformed.into());
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(Stat::PassMalformed.into());
    }
    take(pkt, off, ihl)?;
    if be16(&h[6..]) & 0x1fff != 0 {
        return Err(Stat::PassFragment.into());
    }
    let proto = h[9];
    let dst = ipv4_mapped(h[16..20].try_into().expect("4 bytes"));
    let port = ports(pkt, off + ihl, proto).map_err(|stat| Failure {
        stat,
        dst: (stat == Stat::PassTruncated).then_some((dst, true)),
    })?;
    Ok(Flow {
        src: ipv4_mapped(h[12..16].try_into().expect("4 bytes")),
        dst,
        port,
        proto,
        v4: true,
    })
}

fn parse_v6(pkt: &[u8], off: usize) -> Result<Flow, Failure> {
    let h = take(pkt, off, 40)?;
    if h[0] >> 4 != 6 {
        return Err(Stat::PassMalformed.into());
    }
    let dst: [u8; 16] = h[24..40].try_into().expect("16 bytes");
    // Past the fixed header, a failure to reach the transport header knows
    // the destination.
    let unreached = |stat| Failure {
        stat,
        dst: Some((dst, false)),
    };
    let mut next = h[6];
    let mut at = off + 40;
    let mut followed = 0;
    loop {
        if at > MAX_L4_OFFSET {
            return Err(unreached(Stat::PassMalformed));
        }
        let len = match next {
            0 | 43 | 60 | 51 | 44 if followed == MAX_EXT_HEADERS => {
                return Err(unreached(Stat::PassMalformed));
            }
            0 | 43 | 60 => (usize::from(take(pkt, at, 8).map_err(unreached)?[1]) + 1) * 8,
            51 => (usize::from(take(pkt, at, 8).map_err(unreached)?[1]) + 2) * 4,
            44 => {
                if be16(&take(pkt, at, 8).map_err(unreached)?[2..]) >> 3 != 0 {
                    return Err(Stat::PassFragment.into());
                }
                8
            }
            proto => {
                let port = ports(pkt, at, proto).map_err(|stat| Failure {
                    stat,
                    dst: (stat == Stat::PassTruncated).then_some((dst, false)),
                })?;
                return Ok(Flow {
                    src: h[8..24].try_into().expect("16 bytes"),
                    dst,
                    port,
                    proto,
                    v4: false,
                });
            }
        };
        next = pkt[at];
        at += len;
        followed += 1;
    }
}

/// The verdict for `pkt` under `tables` with `datapath.unparsed: pass`:
/// `(why, listener slot counted under)`.
#[must_use]
pub fn verdict(pkt: &[u8], tables: &PolicyTables) -> (Stat, u32) {
    verdict_with(pkt, tables, &BTreeSet::new())
}

/// The verdict for `pkt` under `tables` and `KF_UNPARSED` holding `unparsed`
/// (addresses, IPv4 mapped; a family's wildcard stands for all of it).
#[must_use]
pub fn verdict_with(
    pkt: &[u8],
    tables: &PolicyTables,
    unparsed: &BTreeSet<[u8; 16]>,
) -> (Stat, u32) {
    let flow = match parse(pkt) {
        Ok(f) => f,
        Err(Failure {
            dst: Some((dst, v4)),
            ..
        }) if unparsed.contains(&dst)
            || unparsed.contains(if v4 { &WILDCARD_V4 } else { &WILDCARD_V6 }) =>
        {
            return (Stat::DropUnparsed, 0);
        }
        Err(failure) => return (failure.stat, 0),
    };
    tables.decide(&flow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{L4, arp, simple};
    use keyfence::{
        maps::{memory::MemoryBackend, policy::PolicyWriter},
        policy::{Access, CompiledPolicy, ListenerPolicy},
    };

    #[test]
    fn model_basics() {
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        w.apply(&CompiledPolicy {
            listeners: vec![ListenerPolicy {
                name: "api".into(),
                bind: "[::]:8443".parse().unwrap(),
                access: Access::Restricted(vec![
                    "192.0.2.0/24".parse().unwrap(),
                    "::/0".parse().unwrap(),
                ]),
            }],
            next_change: None,
        })
        .unwrap();
        let t = w.tables();
        let tcp = L4::Tcp {
            sport: 1,
            dport: 8443,
        };
        let v = |s: &str, d: &str| {
            verdict(
                &simple(&[], s.parse().unwrap(), d.parse().unwrap(), &tcp),
                &t,
            )
        };
        // IPv4 sources are decided by the direct tables, IPv6 ones by the trie.
        assert_eq!(v("192.0.2.9", "198.51.100.1"), (Stat::PassAllowedDirect, 1));
        assert_eq!(v("203.0.113.9", "198.51.100.1"), (Stat::DropNotAllowed, 1));
        assert_eq!(
            v("2001:db8::9", "2001:db8::1"),
            (Stat::PassAllowedPrefix, 1)
        );
        assert_eq!(
            v("::ffff:203.0.113.9", "2001:db8::1"),
            (Stat::DropNotAllowed, 1)
        );
        assert_eq!(verdict(&arp(), &t), (Stat::PassNotIp, 0));
        assert_eq!(verdict(&arp()[..10], &t), (Stat::PassTruncated, 0));
    }
}
