//! Fuzz `X-Forwarded-For` resolution (SPEC §4, docs/behaviour.md): no input
//! may panic, and the answer obeys the rules whatever the header holds:
//! - a peer outside the trusted proxies is its own client;
//! - the answer is the peer or an address the header names;
//! - how the entries are split over header lines does not matter;
//! - a trusted proxy that appends an untrusted client makes that client the
//!   answer, whatever came before it (so a client cannot forge its way past).
//!
//! Run: `cargo +nightly fuzz run forwarded_for` from this directory.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use keyfence::{
    allowlist::{ClientAddr, Net},
    shim::client_ip::{appended_xff, forwarded_client, is_trusted},
};
use libfuzzer_sys::{arbitrary, fuzz_target};

/// Addresses from a small pool, so trusted and untrusted ones meet often.
#[derive(Debug, arbitrary::Arbitrary)]
enum Addr {
    V4(u8),
    V6(u8),
    Mapped(u8),
    Any(u128),
}

impl Addr {
    fn ip(&self) -> IpAddr {
        match self {
            Self::V4(n) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, *n)),
            Self::V6(n) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(*n))),
            Self::Mapped(n) => IpAddr::V6(Ipv4Addr::new(192, 0, 2, *n).to_ipv6_mapped()),
            Self::Any(n) => IpAddr::V6(Ipv6Addr::from(*n)),
        }
    }
}

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    peer: Addr,
    /// Trusted networks: an address and a prefix length (clamped).
    trusted: Vec<(Addr, u8)>,
    hops: u8,
    /// Raw header lines, as a client or proxy could send them.
    values: Vec<Vec<u8>>,
    /// The client a trusted proxy appends.
    origin: Addr,
}

/// A trusted network as the config holds it (canonical), if this one is.
fn net(addr: &Addr, len: u8) -> Option<Net> {
    let ip = ClientAddr::new(addr.ip()).ip();
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let net = IpNet::new(ip, len % (max + 1)).ok()?.trunc();
    Net::new(net).ok()
}

/// An entry as docs/behaviour.md describes them: an address, `v4:port` or
/// `[v6]:port`, or `[v6]`; written here from the rule, not from the shim's code.
fn entry(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

fuzz_target!(|input: Input| {
    let trusted: Vec<Net> = input
        .trusted
        .iter()
        .take(8)
        .filter_map(|(a, l)| net(a, *l))
        .collect();
    let hops = u32::from(input.hops % 8);
    let peer = ClientAddr::new(input.peer.ip());
    let values: Vec<&[u8]> = input.values.iter().take(8).map(Vec::as_slice).collect();

    let answer = forwarded_client(peer, &values, &trusted, hops);
    if !is_trusted(peer, &trusted) {
        assert_eq!(answer, Some(peer), "an untrusted peer speaks for itself");
    }
    if let Some(client) = answer
        && client != peer
    {
        let named = values
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .filter_map(entry)
            .any(|ip| ClientAddr::new(ip) == client);
        assert!(named, "{client} is neither the peer nor in the header");
    }

    // One line joined by commas gives the same answer as separate lines.
    let joined = values.join(&b","[..]);
    assert_eq!(
        forwarded_client(peer, &[joined.as_slice()], &trusted, hops),
        answer,
        "splitting the header over lines changed the client"
    );

    // A trusted proxy appending an untrusted client: that client, always.
    let origin = ClientAddr::new(input.origin.ip());
    if hops > 0 && is_trusted(peer, &trusted) && !is_trusted(origin, &trusted) {
        let sent = appended_xff(&values, origin);
        assert_eq!(
            forwarded_client(peer, &[sent.as_slice()], &trusted, hops),
            Some(origin),
            "the appended client lost to what came before it: {:?}",
            String::from_utf8_lossy(&sent)
        );
    }
});
