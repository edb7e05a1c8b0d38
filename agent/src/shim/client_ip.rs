//! Which address is the client (SPEC §4): the TCP peer, the source a trusted
//! proxy announces in a PROXY protocol header, or the first untrusted address of
//! `X-Forwarded-For` walked right to left. Pure functions, so every rule is tested
//! without sockets.
//!
//! Addresses are folded once, where they enter ([`ClientAddr::new`]): the
//! accepted peer, the PROXY header's source, each `X-Forwarded-For` entry.
//! A connection's requests are resolved by [`ConnClient::resolve`] under the
//! `client_ip` rule the connection was accepted with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hyper::header::HeaderMap;

use crate::{
    allowlist::{ClientAddr, Net},
    config::{ClientIp, ClientIpSource},
};

/// Where one connection's requests come from, fixed when it is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnClient {
    /// The TCP peer.
    pub peer: ClientAddr,
    /// Who the connection speaks for: the peer, or the source its PROXY
    /// header announced (the proxy itself for `LOCAL` and `UNKNOWN`).
    pub client: ClientAddr,
}

impl ConnClient {
    /// A connection whose peer is its client (no PROXY header).
    #[must_use]
    pub fn direct(peer: ClientAddr) -> Self {
        Self { peer, client: peer }
    }

    /// A connection from a trusted proxy that announced `source`.
    #[must_use]
    pub fn proxied(peer: ClientAddr, source: Option<SocketAddr>) -> Self {
        Self {
            peer,
            client: source.map_or(peer, |s| ClientAddr::new(s.ip())),
        }
    }

    /// The client of one request on this connection under `rule` (the rule
    /// the connection was accepted with). `None` when `X-Forwarded-For`
    /// leaves it unknown.
    #[must_use]
    pub fn resolve(&self, rule: &ClientIp, headers: &HeaderMap) -> Option<ClientAddr> {
        match rule.source {
            ClientIpSource::XForwardedFor => {
                // Raw bytes: a value that is not UTF-8 must not vanish (with
                // the address a proxy appended to it) and leave the proxy as client.
                let values: Vec<&[u8]> = headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .map(hyper::header::HeaderValue::as_bytes)
                    .collect();
                forwarded_client(self.peer, &values, &rule.trusted_proxies, rule.hops)
            }
            ClientIpSource::Peer | ClientIpSource::ProxyProtocol => Some(self.client),
        }
    }
}

/// Longest PROXY v1 header: `PROXY TCP6 <39> <39> <5> <5>\r\n` (spec: 107 bytes).
pub const PROXY_V1_MAX: usize = 107;
/// The PROXY v2 signature.
pub const PROXY_V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Largest v2 header we accept (16-byte fixed part + addresses + TLVs).
pub const PROXY_V2_MAX: usize = 16 + 536;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY v1 header")]
    BadV1,
    #[error("malformed PROXY v2 header")]
    BadV2,
    #[error("PROXY v2 header longer than {PROXY_V2_MAX} bytes")]
    TooLong,
}

/// Outcome of parsing the start of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyParse {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of `len` bytes. `source` is `None` for `LOCAL` (v2) and
    /// `UNKNOWN` (v1): the proxy speaks for itself (health checks).
    Done {
        len: usize,
        source: Option<SocketAddr>,
    },
}

/// Parse a PROXY protocol v1 or v2 header at the start of `buf`.
pub fn parse_proxy_header(buf: &[u8]) -> Result<ProxyParse, ProxyError> {
    if buf.is_empty() {
        return Ok(ProxyParse::Incomplete);
    }
    let v2_prefix = buf.len().min(PROXY_V2_SIG.len());
    if buf[..v2_prefix] == PROXY_V2_SIG[..v2_prefix] {
        return if buf.len() < 16 {
            Ok(ProxyParse::Incomplete)
        } else {
            parse_v2(buf)
        };
    }
    let v1_prefix = buf.len().min(6);
    if buf[..v1_prefix] == b"PROXY "[..v1_prefix] {
        return parse_v1(buf);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<ProxyParse, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= PROXY_V1_MAX {
            Err(ProxyError::BadV1)
        } else {
            Ok(ProxyParse::Incomplete)
        };
    };
    if end + 2 > PROXY_V1_MAX {
        return Err(ProxyError::BadV1);
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::BadV1)?;
    let parts: Vec<&str> = line.split(' ').collect();
    let len = end + 2;
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(ProxyParse::Done { len, source: None }),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let src: IpAddr = src.parse().map_err(|_| ProxyError::BadV1)?;
            let dst: IpAddr = dst.parse().map_err(|_| ProxyError::BadV1)?;
            let v4 = *family == "TCP4";
            if src.is_ipv4() != v4 || dst.is_ipv4() != v4 {
                return Err(ProxyError::BadV1);
            }
            let port = |p: &str| -> Result<u16, ProxyError> {
                // Ports are decimal without leading zeros or signs.
                if p.is_empty() || (p.len() > 1 && p.starts_with('0')) {
                    return Err(ProxyError::BadV1);
                }
                p.parse().map_err(|_| ProxyError::BadV1)
            };
            let sport = port(sport)?;
            port(dport)?;
            Ok(ProxyParse::Done {
                len,
                source: Some(SocketAddr::new(src, sport)),
            })
        }
        _ => Err(ProxyError::BadV1),
    }
}

fn parse_v2(buf: &[u8]) -> Result<ProxyParse, ProxyError> {
    let ver_cmd = buf[12];
    let fam = buf[13];
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > PROXY_V2_MAX {
        return Err(ProxyError::TooLong);
    }
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2);
    }
    if buf.len() < len {
        return Ok(ProxyParse::Incomplete);
    }
    let addrs = &buf[16..len];
    match ver_cmd & 0x0f {
        // LOCAL: the proxy's own connection; addresses are ignored.
        0x0 => Ok(ProxyParse::Done { len, source: None }),
        0x1 => {
            let source = match fam >> 4 {
                // AF_INET
                0x1 => {
                    if addrs.len() < 12 {
                        return Err(ProxyError::BadV2);
                    }
                    let ip = Ipv4Addr::new(addrs[0], addrs[1], addrs[2], addrs[3]);
                    let port = u16::from_be_bytes([addrs[8], addrs[9]]);
                    Some(SocketAddr::new(IpAddr::V4(ip), port))
                }
                // AF_INET6
                0x2 => {
                    if addrs.len() < 36 {
                        return Err(ProxyError::BadV2);
                    }
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&addrs[..16]);
                    let port = u16::from_be_bytes([addrs[32], addrs[33]]);
                    Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
                }
                // AF_UNSPEC / AF_UNIX: no IP source to speak of.
                0x0 | 0x3 => None,
                _ => return Err(ProxyError::BadV2),
            };
            Ok(ProxyParse::Done { len, source })
        }
        _ => Err(ProxyError::BadV2),
    }
}

/// Is `ip` inside any of `nets` (canonical, as the config holds them)?
#[must_use]
pub fn is_trusted(ip: ClientAddr, nets: &[Net]) -> bool {
    let ip = ip.ip();
    nets.iter().any(|n| n.contains(&ip))
}

/// One `X-Forwarded-For` element: an address, optionally `[v6]:port` or `v4:port`.
/// Bytes that are not UTF-8 (obs-text) cannot be an address: `None`.
fn parse_xff_entry(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}

/// The client address of a request with `X-Forwarded-For` (SPEC §4).
///
/// A peer outside `trusted` is its own client, whatever the header says. From a
/// trusted peer, walk the header (all its values, in order) right to left,
/// skipping trusted addresses but at most `hops` of them; the first other
/// address is the client. No header, or only skipped entries: the last address
/// examined (the peer itself when there is none). An unparsable entry where
/// the client should be yields `None`: the client is unknown, and only an
/// unrestricted key may be used.
///
/// The values are raw header bytes, split on `,` before anything is decoded:
/// a value with a byte that is not UTF-8 must not vanish as a whole, or the
/// client address a trusted proxy appended to the same line would vanish with
/// it and the proxy itself would become the client.
#[must_use]
pub fn forwarded_client<V: AsRef<[u8]>>(
    peer: ClientAddr,
    xff_values: &[V],
    trusted: &[Net],
    hops: u32,
) -> Option<ClientAddr> {
    if !is_trusted(peer, trusted) {
        return Some(peer);
    }
    let mut last = peer;
    let mut skipped = 0u32;
    let entries = xff_values
        .iter()
        .flat_map(|v| v.as_ref().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
        .collect::<Vec<_>>();
    for entry in entries.into_iter().rev() {
        let ip = ClientAddr::new(parse_xff_entry(entry)?);
        if skipped < hops && is_trusted(ip, trusted) {
            skipped += 1;
            last = ip;
            continue;
        }
        return Some(ip);
    }
    Some(last)
}

/// The `X-Forwarded-For` value sent upstream: every value that came in, in
/// order and byte for byte, then `origin`. Working on bytes keeps a value the
/// shim cannot read from being silently replaced (which would hide from the
/// upstream what the client claimed).
#[must_use]
pub fn appended_xff<V: AsRef<[u8]>>(previous: &[V], origin: ClientAddr) -> Vec<u8> {
    let mut out = Vec::new();
    for value in previous {
        let value = value.as_ref().trim_ascii();
        if value.is_empty() {
            continue;
        }
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(origin.to_string().as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<Net> {
        v.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// Parsed and folded, as at accept.
    fn client(s: &str) -> ClientAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let h = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\r\nGET /";
        assert_eq!(
            parse_proxy_header(h),
            Ok(ProxyParse::Done {
                len: 44,
                source: Some("203.0.113.7:51000".parse().unwrap())
            })
        );
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n";
        assert_eq!(
            parse_proxy_header(h),
            Ok(ProxyParse::Done {
                len: h.len(),
                source: Some("[2001:db8::7]:51000".parse().unwrap())
            })
        );
        assert_eq!(
            parse_proxy_header(b"PROXY UNKNOWN\r\n"),
            Ok(ProxyParse::Done {
                len: 15,
                source: None
            })
        );
    }

    #[test]
    fn v1_incomplete_then_bad() {
        assert_eq!(parse_proxy_header(b"PRO"), Ok(ProxyParse::Incomplete));
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 203.0.113.7"),
            Ok(ProxyParse::Incomplete)
        );
        for bad in [
            &b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n"[..],
            b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
            b"PROXY TCP5 203.0.113.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 01 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 2\r\n",
            b"PROXY TCP4 example.com 192.0.2.1 1 2\r\n",
            b"PROXY  TCP4 203.0.113.7 192.0.2.1 1 2\r\n",
        ] {
            assert_eq!(parse_proxy_header(bad), Err(ProxyError::BadV1), "{bad:?}");
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse_proxy_header(&long), Err(ProxyError::BadV1));
        assert_eq!(
            parse_proxy_header(b"GET / HTTP/1.1\r\n"),
            Err(ProxyError::Missing)
        );
    }

    fn v2(cmd: u8, fam: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = PROXY_V2_SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&u16::try_from(addrs.len()).unwrap().to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn v2_inet_inet6_local() {
        let mut a = vec![203, 0, 113, 7, 192, 0, 2, 1];
        a.extend_from_slice(&51000u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &a);
        assert_eq!(
            parse_proxy_header(&h),
            Ok(ProxyParse::Done {
                len: 28,
                source: Some("203.0.113.7:51000".parse().unwrap())
            })
        );
        assert_eq!(parse_proxy_header(&h[..20]), Ok(ProxyParse::Incomplete));

        let mut a6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        a6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        a6.extend_from_slice(&[0xc7, 0x38, 0x01, 0xbb]);
        // A TLV after the addresses is skipped by the length.
        a6.extend_from_slice(&[0x04, 0x00, 0x01, 0xaa]);
        let h = v2(1, 0x21, &a6);
        assert_eq!(
            parse_proxy_header(&h),
            Ok(ProxyParse::Done {
                len: h.len(),
                source: Some("[2001:db8::7]:51000".parse().unwrap())
            })
        );
        assert_eq!(
            parse_proxy_header(&v2(0, 0x00, &[])),
            Ok(ProxyParse::Done {
                len: 16,
                source: None
            })
        );
    }

    #[test]
    fn v2_bad() {
        assert_eq!(
            parse_proxy_header(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyError::BadV2)
        );
        assert_eq!(
            parse_proxy_header(&v2(2, 0x11, &[0; 12])),
            Err(ProxyError::BadV2)
        );
        assert_eq!(
            parse_proxy_header(&v2(1, 0x41, &[0; 12])),
            Err(ProxyError::BadV2)
        );
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert_eq!(parse_proxy_header(&bad_version), Err(ProxyError::BadV2));
        let mut huge = PROXY_V2_SIG.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse_proxy_header(&huge), Err(ProxyError::TooLong));
    }

    #[test]
    fn untrusted_peer_is_its_own_client() {
        let t = nets(&["198.51.100.0/24"]);
        assert_eq!(
            forwarded_client(client("203.0.113.9"), &["192.0.2.10"], &t, 1),
            Some(client("203.0.113.9"))
        );
    }

    #[test]
    fn rightmost_untrusted_wins() {
        let t = nets(&["198.51.100.0/24"]);
        // A client-forged left part is ignored.
        assert_eq!(
            forwarded_client(client("198.51.100.1"), &["192.0.2.66, 203.0.113.7"], &t, 1),
            Some(client("203.0.113.7"))
        );
        // Trusted hops are skipped, at most `hops` of them.
        let chain = ["203.0.113.7, 198.51.100.2, 198.51.100.3"];
        assert_eq!(
            forwarded_client(client("198.51.100.1"), &chain, &t, 2),
            Some(client("203.0.113.7"))
        );
        assert_eq!(
            forwarded_client(client("198.51.100.1"), &chain, &t, 1),
            Some(client("198.51.100.2"))
        );
        // Several header lines count as one list, in order.
        assert_eq!(
            forwarded_client(
                client("198.51.100.1"),
                &["203.0.113.7", "198.51.100.3"],
                &t,
                1
            ),
            Some(client("203.0.113.7"))
        );
    }

    #[test]
    fn forms_folding_and_garbage() {
        let t = nets(&["198.51.100.0/24", "2001:db8:ff::/48"]);
        assert_eq!(
            forwarded_client(
                client("::ffff:198.51.100.1"),
                &["[2001:db8::7]:4711"],
                &t,
                1
            ),
            Some(client("2001:db8::7"))
        );
        assert_eq!(
            forwarded_client(client("2001:db8:ff::1"), &["::ffff:203.0.113.7"], &t, 1),
            Some(client("203.0.113.7"))
        );
        assert_eq!(
            forwarded_client(client("198.51.100.1"), &["203.0.113.7:80"], &t, 1),
            Some(client("203.0.113.7"))
        );
        assert_eq!(
            forwarded_client(client("198.51.100.1"), &["unknown"], &t, 1),
            None
        );
        assert_eq!(
            forwarded_client::<&str>(client("198.51.100.1"), &[], &t, 1),
            Some(client("198.51.100.1"))
        );
        assert_eq!(
            forwarded_client(client("198.51.100.1"), &[" , "], &t, 1),
            Some(client("198.51.100.1"))
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_make_the_client_unknown_never_the_peer() {
        let t = nets(&["198.51.100.0/24"]);
        let proxy = client("198.51.100.250");
        // Where the client should be: unknown, not the trusted proxy.
        for bad in [
            &b"x\xff"[..],
            b"192.0.2.99\xff",
            b"\xff",
            b"192.0.2.99, 203.0.113.7\xff",
            b"203.0.113.7\x80:80",
        ] {
            assert_eq!(forwarded_client(proxy, &[bad], &t, 1), None, "{bad:?}");
        }
        // A line that nginx's $proxy_add_x_forwarded_for built: the client's
        // bytes on the left, the address the proxy saw on the right.
        assert_eq!(
            forwarded_client(proxy, &[&b"192.0.2.99\xff, 203.0.113.7"[..]], &t, 1),
            Some(client("203.0.113.7"))
        );
        // Also when the proxy added its own line after the client's.
        assert_eq!(
            forwarded_client(proxy, &[&b"\xff\xfe"[..], b"203.0.113.7"], &t, 1),
            Some(client("203.0.113.7"))
        );
        // A skipped trusted hop does not make a bad entry behind it readable.
        assert_eq!(
            forwarded_client(proxy, &[&b"x\xff, 198.51.100.3"[..]], &t, 1),
            None
        );
        // An untrusted peer is still its own client, whatever bytes it sends.
        assert_eq!(
            forwarded_client(client("203.0.113.9"), &[&b"\xff"[..]], &t, 1),
            Some(client("203.0.113.9"))
        );
        // Tabs are whitespace in a header value.
        assert_eq!(
            forwarded_client(proxy, &[&b"\t203.0.113.7\t"[..]], &t, 1),
            Some(client("203.0.113.7"))
        );
    }

    #[test]
    fn appended_xff_keeps_every_value_byte_for_byte() {
        let origin = client("198.51.100.250");
        assert_eq!(appended_xff::<&[u8]>(&[], origin), b"198.51.100.250");
        assert_eq!(
            appended_xff(&[&b"192.0.2.99\xff"[..]], origin),
            b"192.0.2.99\xff, 198.51.100.250"
        );
        // Several lines are kept in order, not only the first.
        assert_eq!(
            appended_xff(&["192.0.2.1", " 192.0.2.2 ", ""], origin),
            b"192.0.2.1, 192.0.2.2, 198.51.100.250"
        );
        assert_eq!(
            appended_xff(&["2001:db8::7"], client("2001:db8::1")),
            b"2001:db8::7, 2001:db8::1"
        );
    }
}
