//! Hand-made IPv6 SYNs behind extension-header chains, sent through a raw
//! socket, and whether the destination answered with a SYN-ACK: the
//! handshake's first half, which is all an attacker needs to hold a slot in a
//! listener's queue. Used by `e2e_datapath` to check what the datapath lets
//! through to the shim.

use std::{
    io::{self, Read as _},
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::frames::{Ext, PROTO_TCP, ipv6};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A TCP SYN from `src:sport` to `dst:dport` with a correct checksum (the
/// receiving stack checks it, unlike the datapath).
#[must_use]
pub fn tcp_syn(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&0x1357_9bdf_u32.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = TCP_SYN;
    h[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // RFC 8200 §8.1: the pseudo-header is the addresses, the upper-layer
    // length and the next header; extension headers are not covered.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&20u32.to_be_bytes());
    add(&[0, 0, 0, PROTO_TCP]);
    add(&h);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !u16::try_from(sum).unwrap_or(0);
    h[16..18].copy_from_slice(&checksum.to_be_bytes());
    h
}

/// Send one SYN from `src:sport` to `dst` behind `exts` and wait up to `wait`
/// for a SYN-ACK to it. Call inside the sender's namespace (`Netns::run`).
/// The sender's stack answers the SYN-ACK with a RST (no socket owns the
/// port), so the half-open connection is gone again right after.
pub fn syn_answered(
    src: Ipv6Addr,
    sport: u16,
    dst: SocketAddrV6,
    exts: &[Ext],
    wait: Duration,
) -> io::Result<bool> {
    // Every TCP segment arriving here is copied to a raw TCP socket, without
    // the IPv6 header; bound and connected, it keeps only those from `dst`'s
    // address to `src` (unbound, `connect` would pick a source address and
    // filter on that one). Opened before sending, so the answer cannot be missed.
    let to = SockAddr::from(SocketAddr::V6(SocketAddrV6::new(*dst.ip(), 0, 0, 0)));
    let mut listen = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::TCP))?;
    listen.bind(&SockAddr::from(SocketAddr::V6(SocketAddrV6::new(
        src, 0, 0, 0,
    ))))?;
    listen.connect(&to)?;
    // IPPROTO_RAW on IPv6: the packet carries its own IPv6 header (and chain).
    let send = Socket::new(
        Domain::IPV6,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let tcp = tcp_syn(src, *dst.ip(), sport, dst.port());
    let packet = ipv6(src, *dst.ip(), exts, PROTO_TCP, None, &tcp);
    send.send_to(&packet, &to)?;
    let deadline = Instant::now() + wait;
    let mut seg = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        listen.set_read_timeout(Some(left))?;
        let n = match listen.read(&mut seg) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let seg = &seg[..n];
        if seg.len() >= 20
            && u16::from_be_bytes([seg[0], seg[1]]) == dst.port()
            && u16::from_be_bytes([seg[2], seg[3]]) == sport
            && seg[13] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        {
            return Ok(true);
        }
    }
}
