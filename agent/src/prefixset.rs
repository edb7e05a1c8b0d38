//! A set of IP networks kept in canonical form (the maximal aligned blocks of
//! their union, as `IpNet::aggregate` gives), updated in place: adding a
//! network touches only the blocks it covers and the siblings it merges with,
//! and taking networks away rebuilds only the blocks that held them.
//!
//! It takes canonical networks ([`Net`]) and its blocks are canonical too:
//! supernets and siblings of canonical networks are.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::allowlist::Net;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixSet {
    blocks: BTreeSet<Net>,
}

/// Blocks that left and joined a set over some updates, net of each other
/// (a block that left and came back is in neither).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub removed: BTreeSet<Net>,
    pub added: BTreeSet<Net>,
}

impl Change {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }

    fn remove(&mut self, block: Net) {
        if !self.added.remove(&block) {
            self.removed.insert(block);
        }
    }

    fn add(&mut self, block: Net) {
        if !self.removed.remove(&block) {
            self.added.insert(block);
        }
    }
}

impl PrefixSet {
    #[must_use]
    pub fn from_nets(nets: impl IntoIterator<Item = Net>) -> Self {
        let nets: Vec<Net> = nets.into_iter().collect();
        Self {
            blocks: Net::aggregate(&nets).into_iter().collect(),
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The blocks in order (IPv4 first, then by address and length).
    pub fn iter(&self) -> impl Iterator<Item = &Net> {
        self.blocks.iter()
    }

    /// The block that covers `net`, if any. Blocks are disjoint and sorted
    /// by address, so only the last block at or before `net` can cover it.
    #[must_use]
    pub fn covering(&self, net: &Net) -> Option<Net> {
        self.blocks
            .range(..=*net)
            .next_back()
            .filter(|b| b.contains(&net.get()))
            .copied()
    }

    /// Add `net`: the blocks inside it go, and it merges upwards while its
    /// sibling is a block too (a sibling covered by smaller blocks cannot
    /// happen: they would have merged into it).
    pub fn insert(&mut self, net: Net, change: &mut Change) {
        if self.covering(&net).is_some() {
            return;
        }
        // Contiguous from `net` on, as in [`inside`].
        let inside: Vec<Net> = self
            .blocks
            .range(net..)
            .take_while(|n| net.contains(&n.get()))
            .copied()
            .collect();
        for n in inside {
            self.blocks.remove(&n);
            change.remove(n);
        }
        let mut block = net;
        while let Some(sibling) = sibling(block) {
            if !self.blocks.remove(&sibling) {
                break;
            }
            change.remove(sibling);
            block = Net::derived(
                block
                    .supernet()
                    .expect("a network with a sibling has a parent"),
            );
        }
        self.blocks.insert(block);
        change.add(block);
    }

    /// Take networks away: `gone` are networks no longer wanted;
    /// `remaining(block)` lists the networks still wanted inside `block`
    /// ([`inside`] finds them in a sorted map). Only the blocks that cover
    /// something in `gone` are rebuilt, from the remaining networks inside them.
    pub fn remove(
        &mut self,
        gone: &[Net],
        remaining: impl Fn(Net) -> Vec<Net>,
        change: &mut Change,
    ) {
        let affected: BTreeSet<Net> = gone.iter().filter_map(|n| self.covering(n)).collect();
        for block in affected {
            self.blocks.remove(&block);
            change.remove(block);
            let inside = remaining(block);
            for net in Net::aggregate(&inside) {
                self.blocks.insert(net);
                change.add(net);
            }
        }
    }
}

/// The keys of a sorted map inside `block`. In `Net` order (address, then
/// length) they follow `block` without a gap: a network after it whose
/// address lies in the block is longer, so inside; a shorter one could
/// start only at the block's own address, and it sorts before the block.
pub fn inside<V>(map: &BTreeMap<Net, V>, block: Net) -> impl Iterator<Item = Net> + '_ {
    map.range(block..)
        .map(|(n, _)| *n)
        .take_while(move |n| block.contains(&n.get()))
}

/// The other half of `net`'s parent (`None` for `/0`, and for the sibling
/// of `::fffe:0:0/96`, which is not canonical and so never a block).
fn sibling(net: Net) -> Option<Net> {
    let len = net.prefix_len();
    if len == 0 {
        return None;
    }
    Net::new(match *net {
        IpNet::V4(n) => {
            let bit = 1_u32 << (32 - u32::from(len));
            IpNet::V4(
                Ipv4Net::new((u32::from(n.network()) ^ bit).into(), len).expect("same length"),
            )
        }
        IpNet::V6(n) => {
            let bit = 1_u128 << (128 - u32::from(len));
            IpNet::V6(
                Ipv6Net::new((u128::from(n.network()) ^ bit).into(), len).expect("same length"),
            )
        }
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Net {
        s.parse().unwrap()
    }

    /// `remaining` for [`PrefixSet::remove`] from a plain list.
    fn within(nets: &[Net]) -> impl Fn(Net) -> Vec<Net> + '_ {
        |block| {
            nets.iter()
                .filter(|n| block.contains(&n.get()))
                .copied()
                .collect()
        }
    }

    fn blocks(set: &PrefixSet) -> Vec<String> {
        set.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn siblings_merge_upwards_and_covered_blocks_go() {
        let mut set = PrefixSet::default();
        let c = &mut Change::default();
        set.insert(net("192.0.2.0/26"), c);
        set.insert(net("192.0.2.64/26"), c);
        assert_eq!(blocks(&set), ["192.0.2.0/25"]);
        set.insert(net("192.0.2.200/32"), c);
        set.insert(net("192.0.2.128/25"), c);
        assert_eq!(blocks(&set), ["192.0.2.0/24"]);
        set.insert(net("192.0.2.7/32"), c);
        assert_eq!(blocks(&set), ["192.0.2.0/24"], "covered: no change");
        set.insert(net("2001:db8::/33"), c);
        set.insert(net("2001:db8:8000::/33"), c);
        assert_eq!(blocks(&set), ["192.0.2.0/24", "2001:db8::/32"]);
    }

    #[test]
    fn removal_rebuilds_only_from_what_remains() {
        let mut set = PrefixSet::from_nets([net("192.0.2.0/25"), net("192.0.2.128/25")]);
        let c = &mut Change::default();
        assert_eq!(blocks(&set), ["192.0.2.0/24"]);
        set.remove(&[net("192.0.2.128/25")], within(&[net("192.0.2.0/25")]), c);
        assert_eq!(blocks(&set), ["192.0.2.0/25"]);
        // A network that is still wanted elsewhere keeps its block.
        set.remove(&[net("192.0.2.0/25")], within(&[net("192.0.2.0/25")]), c);
        assert_eq!(blocks(&set), ["192.0.2.0/25"]);
        set.remove(&[net("192.0.2.0/25")], within(&[net("198.51.100.0/24")]), c);
        assert!(set.is_empty());
    }

    #[test]
    fn inside_reads_only_the_networks_within_a_block() {
        let map: BTreeMap<Net, u32> = [
            "10.0.0.0/7",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.255.255.255/32",
            "11.0.0.0/8",
            "2001:db8::/32",
        ]
        .iter()
        .map(|s| (net(s), 1))
        .collect();
        let got: Vec<String> = inside(&map, net("10.0.0.0/8"))
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, ["10.0.0.0/8", "10.1.0.0/16", "10.255.255.255/32"]);
        assert_eq!(inside(&map, net("12.0.0.0/8")).count(), 0);
    }

    #[test]
    fn a_sibling_that_is_not_canonical_never_merges() {
        // `::fffe:0:0/96`'s sibling would be `::ffff:0:0/96`, which is
        // `0.0.0.0/0` in canonical form: no merge across the families.
        let mut set = PrefixSet::default();
        let c = &mut Change::default();
        set.insert(net("0.0.0.0/0"), c);
        set.insert(net("::fffe:0:0/96"), c);
        assert_eq!(blocks(&set), ["0.0.0.0/0", "::fffe:0:0/96"]);
    }

    const POOL: [&str; 16] = [
        "192.0.2.0/24",
        "192.0.2.0/25",
        "192.0.2.128/25",
        "192.0.2.0/26",
        "192.0.2.64/26",
        "192.0.2.1/32",
        "192.0.2.0/32",
        "192.0.3.0/24",
        "0.0.0.0/0",
        "198.51.100.0/24",
        "2001:db8::/32",
        "2001:db8::/33",
        "2001:db8:8000::/33",
        "2001:db8::1/128",
        "2001:db8::/128",
        "::/0",
    ];

    proptest! {
        /// After any sequence of adds and removes the set equals the
        /// aggregate of the networks wanted at that point.
        #[test]
        fn matches_a_full_aggregate(
            start in prop::sample::subsequence(POOL.to_vec(), 0..8),
            steps in prop::collection::vec(
                (any::<bool>(), prop::sample::subsequence(POOL.to_vec(), 1..4)),
                1..12,
            ),
        ) {
            let mut wanted: Vec<Net> = start.iter().map(|s| net(s)).collect();
            let mut set = PrefixSet::from_nets(wanted.clone());
            let mut change = Change::default();
            let mut seen = set.blocks.clone();
            for (add, nets) in steps {
                let nets: Vec<Net> = nets.iter().map(|s| net(s)).collect();
                if add {
                    wanted.extend(&nets);
                    for n in &nets {
                        set.insert(*n, &mut change);
                    }
                } else {
                    wanted.retain(|n| !nets.contains(n));
                    set.remove(&nets, within(&wanted), &mut change);
                }
                prop_assert_eq!(&set, &PrefixSet::from_nets(wanted.clone()));
                // The change, applied to where it started, gives where it is.
                for n in &change.removed {
                    prop_assert!(seen.remove(n), "{} removed but never there", n);
                }
                for n in &change.added {
                    prop_assert!(seen.insert(*n), "{} added twice", n);
                }
                prop_assert_eq!(&seen, &set.blocks);
                change = Change::default();
            }
        }
    }
}
