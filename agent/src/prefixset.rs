//! A set of IP networks kept in canonical form (the maximal aligned blocks of
//! their union, as `IpNet::aggregate` gives), updated in place: adding a
//! network touches only the blocks it covers and the siblings it merges with,
//! and taking networks away rebuilds only the blocks that held them.

use std::{collections::BTreeSet, ops::RangeInclusive};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixSet {
    blocks: BTreeSet<IpNet>,
}

/// Blocks that left and joined a set over some updates, net of each other
/// (a block that left and came back is in neither).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub removed: BTreeSet<IpNet>,
    pub added: BTreeSet<IpNet>,
}

impl Change {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }

    fn remove(&mut self, block: IpNet) {
        if !self.added.remove(&block) {
            self.removed.insert(block);
        }
    }

    fn add(&mut self, block: IpNet) {
        if !self.removed.remove(&block) {
            self.added.insert(block);
        }
    }
}

impl PrefixSet {
    #[must_use]
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let nets: Vec<IpNet> = nets.into_iter().map(|n| n.trunc()).collect();
        Self {
            blocks: IpNet::aggregate(&nets).into_iter().collect(),
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
    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.blocks.iter()
    }

    /// The block that covers `net`, if any. Blocks are disjoint and sorted
    /// by address, so only the last block at or before `net` can cover it.
    #[must_use]
    pub fn covering(&self, net: &IpNet) -> Option<IpNet> {
        let net = net.trunc();
        self.blocks
            .range(..=net)
            .next_back()
            .filter(|b| b.contains(&net))
            .copied()
    }

    /// Add `net`: the blocks inside it go, and it merges upwards while its
    /// sibling is a block too (a sibling covered by smaller blocks cannot
    /// happen: they would have merged into it).
    pub fn insert(&mut self, net: IpNet, change: &mut Change) {
        let net = net.trunc();
        if self.covering(&net).is_some() {
            return;
        }
        let inside: Vec<IpNet> = self.blocks.range(net..=last_inside(net)).copied().collect();
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
            block = block
                .supernet()
                .expect("a network with a sibling has a parent");
        }
        self.blocks.insert(block);
        change.add(block);
    }

    /// Take networks away: `gone` are networks no longer wanted;
    /// `remaining(range)` lists the networks still wanted within a range of
    /// `IpNet` order (host bits clear). Only the blocks that cover something
    /// in `gone` are rebuilt, from the remaining networks inside them.
    pub fn remove(
        &mut self,
        gone: &[IpNet],
        remaining: impl Fn(RangeInclusive<IpNet>) -> Vec<IpNet>,
        change: &mut Change,
    ) {
        let affected: BTreeSet<IpNet> = gone.iter().filter_map(|n| self.covering(n)).collect();
        for block in affected {
            self.blocks.remove(&block);
            change.remove(block);
            let inside = remaining(block..=last_inside(block));
            for net in IpNet::aggregate(&inside) {
                self.blocks.insert(net);
                change.add(net);
            }
        }
    }
}

/// The greatest network (in `IpNet` order) inside `net`.
fn last_inside(net: IpNet) -> IpNet {
    match net {
        IpNet::V4(n) => IpNet::V4(Ipv4Net::new(n.broadcast(), 32).expect("/32")),
        IpNet::V6(n) => IpNet::V6(Ipv6Net::new(n.broadcast(), 128).expect("/128")),
    }
}

/// The other half of `net`'s parent (`None` for `/0`).
fn sibling(net: IpNet) -> Option<IpNet> {
    let len = net.prefix_len();
    if len == 0 {
        return None;
    }
    Some(match net {
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
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// `remaining` for [`PrefixSet::remove`] from a plain list.
    fn within(nets: &[IpNet]) -> impl Fn(RangeInclusive<IpNet>) -> Vec<IpNet> + '_ {
        |range| nets.iter().filter(|n| range.contains(n)).copied().collect()
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
            let mut wanted: Vec<IpNet> = start.iter().map(|s| net(s)).collect();
            let mut set = PrefixSet::from_nets(wanted.clone());
            let mut change = Change::default();
            let mut seen = set.blocks.clone();
            for (add, nets) in steps {
                let nets: Vec<IpNet> = nets.iter().map(|s| net(s)).collect();
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
