//! A sorted set of networks held in little memory: what the policy writer
//! remembers of each slot it wrote.
//!
//! The networks sit in chunks of up to [`CHUNK_MAX`], each encoded against
//! the one before it: a tag byte (family and prefix length), then how many
//! networks of that length lie between the previous address and this one
//! (the difference of their network numbers at this length) as a LEB128
//! varint. Sorted neighbours are close, so a network takes about 5 bytes
//! instead of the 18 of a `Net` (a million random `/80`s in a `/32`: 4 bytes
//! of distance each). A change touches one chunk (decoded, edited, encoded
//! again), not a memmove of the whole set.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::allowlist::Net;

/// Networks a chunk takes from a bulk build.
const CHUNK_FILL: usize = 128;
/// A chunk that grows past this splits in two.
const CHUNK_MAX: usize = 2 * CHUNK_FILL;

/// Tags at and above this are IPv6 (tag − `V6_TAG` = the prefix length);
/// below it, IPv4.
const V6_TAG: u8 = 64;

#[derive(Clone, Debug)]
struct Chunk {
    /// The smallest network in the chunk: binary searches look only at it.
    first: Net,
    len: u16,
    bytes: Box<[u8]>,
}

impl Chunk {
    fn encode(nets: &[Net]) -> Self {
        debug_assert!(!nets.is_empty() && nets.len() <= CHUNK_MAX);
        let mut bytes = Vec::with_capacity(nets.len() * 6);
        let mut prev = None;
        for &net in nets {
            let (tag, addr) = parts(net);
            let host = host_bits(tag);
            bytes.push(tag);
            put_varint(
                &mut bytes,
                number(addr, host).wrapping_sub(number(base(prev, tag), host)),
            );
            prev = Some((tag, addr));
        }
        Self {
            first: nets[0],
            len: u16::try_from(nets.len()).expect("a chunk holds at most CHUNK_MAX networks"),
            bytes: bytes.into_boxed_slice(),
        }
    }

    fn iter(&self) -> ChunkIter<'_> {
        ChunkIter {
            bytes: &self.bytes,
            prev: None,
        }
    }

    fn decode(&self) -> Vec<Net> {
        let mut out = Vec::with_capacity(usize::from(self.len));
        out.extend(self.iter());
        out
    }
}

struct ChunkIter<'a> {
    bytes: &'a [u8],
    prev: Option<(u8, u128)>,
}

impl Iterator for ChunkIter<'_> {
    type Item = Net;

    fn next(&mut self) -> Option<Net> {
        let (&tag, rest) = self.bytes.split_first()?;
        let (delta, rest) = take_varint(rest);
        self.bytes = rest;
        let host = host_bits(tag);
        let at = number(base(self.prev, tag), host).wrapping_add(delta);
        // `at` is this network's number: below 2^(width − host), so the
        // shift loses nothing.
        let addr = at.checked_shl(host).unwrap_or(0);
        self.prev = Some((tag, addr));
        Some(net_of(tag, addr))
    }
}

/// The address the next network's distance is counted from: the previous
/// one's, within a family; 0 at a chunk's start and where the family changes.
fn base(prev: Option<(u8, u128)>, tag: u8) -> u128 {
    prev.filter(|&(prev_tag, _)| (prev_tag >= V6_TAG) == (tag >= V6_TAG))
        .map_or(0, |(_, addr)| addr)
}

/// Host bits of a network with this tag.
fn host_bits(tag: u8) -> u32 {
    if tag >= V6_TAG {
        128 - u32::from(tag - V6_TAG)
    } else {
        32 - u32::from(tag)
    }
}

/// `addr`'s network number at a length with `host` host bits (0 for a
/// `/0`, whose shift would be the full 128 bits).
fn number(addr: u128, host: u32) -> u128 {
    addr.checked_shr(host).unwrap_or(0)
}

/// Tag and address of a network (IPv4 addresses as their `u32` value).
fn parts(net: Net) -> (u8, u128) {
    match *net {
        IpNet::V4(v4) => (v4.prefix_len(), u128::from(u32::from(v4.addr()))),
        IpNet::V6(v6) => (V6_TAG + v6.prefix_len(), u128::from(v6.addr())),
    }
}

fn net_of(tag: u8, addr: u128) -> Net {
    let net = if tag >= V6_TAG {
        IpNet::V6(
            Ipv6Net::new(Ipv6Addr::from(addr), tag - V6_TAG).expect("encoded from an Ipv6Net"),
        )
    } else {
        let addr = u32::try_from(addr).expect("encoded from an IPv4 address");
        IpNet::V4(Ipv4Net::new(Ipv4Addr::from(addr), tag).expect("encoded from an Ipv4Net"))
    };
    Net::derived(net)
}

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint written by [`put_varint`] and the bytes after it.
fn take_varint(bytes: &[u8]) -> (u128, &[u8]) {
    let mut v = 0_u128;
    for (i, &b) in bytes.iter().enumerate() {
        v |= u128::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (v, &bytes[i + 1..]);
        }
    }
    unreachable!("a varint written by put_varint ends with a byte below 0x80")
}

/// A sorted set of distinct networks, packed (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct PackedNets {
    chunks: Vec<Chunk>,
    len: usize,
}

impl PackedNets {
    /// From networks in ascending order, each once (what the compiler and
    /// `in_order` give).
    #[must_use]
    pub fn from_sorted(nets: &[Net]) -> Self {
        debug_assert!(
            nets.is_sorted_by(|a, b| a < b),
            "from_sorted: not sorted and distinct"
        );
        Self {
            chunks: nets.chunks(CHUNK_FILL).map(Chunk::encode).collect(),
            len: nets.len(),
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The networks in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = Net> + '_ {
        self.chunks.iter().flat_map(Chunk::iter)
    }

    /// The networks, unpacked.
    #[must_use]
    pub fn to_vec(&self) -> Vec<Net> {
        let mut out = Vec::with_capacity(self.len);
        out.extend(self.iter());
        out
    }

    /// The chunk `net` belongs in: the last whose first network is not
    /// above it (the first chunk for a network below them all).
    fn chunk_of(&self, net: &Net) -> usize {
        self.chunks
            .partition_point(|c| c.first <= *net)
            .saturating_sub(1)
    }

    #[must_use]
    pub fn contains(&self, net: &Net) -> bool {
        self.chunks
            .get(self.chunk_of(net))
            .is_some_and(|c| c.iter().take_while(|n| n <= net).any(|n| n == *net))
    }

    /// Add `net`; `false` if it was there.
    pub fn insert(&mut self, net: Net) -> bool {
        if self.chunks.is_empty() {
            self.chunks.push(Chunk::encode(&[net]));
            self.len = 1;
            return true;
        }
        let at = self.chunk_of(&net);
        let mut nets = self.chunks[at].decode();
        let Err(pos) = nets.binary_search(&net) else {
            return false;
        };
        nets.insert(pos, net);
        self.len += 1;
        if nets.len() > CHUNK_MAX {
            let upper = nets.split_off(nets.len() / 2);
            self.chunks[at] = Chunk::encode(&nets);
            self.chunks.insert(at + 1, Chunk::encode(&upper));
        } else {
            self.chunks[at] = Chunk::encode(&nets);
        }
        true
    }

    /// Take `net` out; `false` if it was not there.
    pub fn remove(&mut self, net: &Net) -> bool {
        let at = self.chunk_of(net);
        let Some(chunk) = self.chunks.get(at) else {
            return false;
        };
        let mut nets = chunk.decode();
        let Ok(pos) = nets.binary_search(net) else {
            return false;
        };
        nets.remove(pos);
        self.len -= 1;
        if nets.is_empty() {
            self.chunks.remove(at);
        } else {
            self.chunks[at] = Chunk::encode(&nets);
        }
        true
    }

    /// Heap bytes the set holds (chunk table and encodings).
    #[cfg(test)]
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self.chunks.iter().map(|c| c.bytes.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Net {
        s.parse().expect("canonical test network")
    }

    fn arb_net() -> impl Strategy<Value = Net> {
        prop_oneof![
            (any::<u32>(), 0_u8..=32).prop_map(|(a, len)| Net::derived(IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(a), len)
                    .expect("len ≤ 32")
                    .trunc()
            ))),
            (any::<u128>(), 0_u8..=128).prop_map(|(a, len)| Net::derived(IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(a), len)
                    .expect("len ≤ 128")
                    .trunc()
            ))),
        ]
        .prop_filter("canonical", |n| Net::new(**n).is_ok())
    }

    #[test]
    fn packs_and_unpacks_both_families_in_order() {
        let nets: Vec<Net> = [
            "0.0.0.0/0",
            "192.0.2.0/24",
            "192.0.2.7/32",
            "255.255.255.255/32",
            "2001:db8::/32",
            "2001:db8::1/128",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ]
        .into_iter()
        .map(net)
        .collect();
        let packed = PackedNets::from_sorted(&nets);
        assert_eq!(packed.to_vec(), nets);
        assert_eq!(packed.len(), nets.len());
        assert!(packed.contains(&net("192.0.2.7/32")));
        assert!(!packed.contains(&net("192.0.2.8/32")));
        assert!(!packed.contains(&net("::/0")), "below every IPv6 entry");
        assert!(!PackedNets::default().contains(&net("::/0")));
    }

    #[test]
    fn close_prefixes_take_a_fifth_of_their_vec() {
        let nets: Vec<Net> = (0..200_000_u128)
            .map(|i| {
                let addr = (0x2001_0db8_u128 << 96) | (i * 7919) << 48;
                Net::derived(IpNet::V6(
                    Ipv6Net::new(Ipv6Addr::from(addr), 80).expect("len ≤ 128"),
                ))
            })
            .collect();
        let packed = PackedNets::from_sorted(&nets);
        let vec_bytes = nets.len() * std::mem::size_of::<Net>();
        assert!(
            packed.heap_bytes() * 5 < vec_bytes,
            "{} packed bytes against {vec_bytes}",
            packed.heap_bytes()
        );
        assert!(packed.iter().eq(nets.iter().copied()));
    }

    #[test]
    fn inserts_into_one_chunk_split_it_and_removes_empty_it() {
        let nets: Vec<Net> = (0..1000_u32)
            .map(|i| {
                Net::derived(IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(0xc000_0200 + i), 32).expect("len ≤ 32"),
                ))
            })
            .collect();
        let mut packed = PackedNets::default();
        for &n in nets.iter().rev() {
            assert!(packed.insert(n));
        }
        assert!(!packed.insert(nets[500]), "already there");
        assert!(
            packed.chunks.len() >= 1000 / CHUNK_MAX,
            "{} chunks",
            packed.chunks.len()
        );
        assert!(
            packed
                .chunks
                .iter()
                .all(|c| usize::from(c.len) <= CHUNK_MAX)
        );
        assert!(packed.iter().eq(nets.iter().copied()));
        for n in &nets {
            assert!(packed.remove(n));
        }
        assert!(packed.is_empty() && packed.chunks.is_empty());
        assert!(!packed.remove(&nets[0]));
    }

    proptest! {
        /// Every insert and remove agrees with a `BTreeSet`, and the set
        /// reads back sorted and whole, across chunk splits and removals.
        #[test]
        fn edits_agree_with_a_btreeset(
            start in proptest::collection::btree_set(arb_net(), 0..600),
            edits in proptest::collection::vec((any::<bool>(), arb_net()), 0..600),
        ) {
            let first: Vec<Net> = start.iter().copied().collect();
            let mut packed = PackedNets::from_sorted(&first);
            let mut model = start;
            for (add, n) in edits {
                if add {
                    prop_assert_eq!(packed.insert(n), model.insert(n));
                } else {
                    prop_assert_eq!(packed.remove(&n), model.remove(&n));
                }
                prop_assert_eq!(packed.contains(&n), model.contains(&n));
            }
            // Members go too, every other one, emptying chunks on the way.
            let members: Vec<Net> = model.iter().copied().step_by(2).collect();
            for n in &members {
                prop_assert!(packed.remove(n));
                model.remove(n);
                prop_assert!(!packed.contains(n));
            }
            prop_assert_eq!(packed.len(), model.len());
            prop_assert!(packed.iter().eq(model.iter().copied()));
            for n in &model {
                prop_assert!(packed.contains(n));
            }
        }
    }
}
