//! A set of IP networks kept in canonical form (the maximal aligned blocks of
//! their union, as `IpNet::aggregate` gives), updated in place: adding a
//! network touches only the blocks it covers and the siblings it merges with,
//! and taking networks away rebuilds only the blocks that held them.
//!
//! The set counts its members (a network added twice must be released twice
//! before it goes), and keeps them without a second copy: a member is either
//! a block itself (marked so) or lies inside one (`covered`, empty unless
//! members merge or nest), and only members added more than once have a
//! count (`extra`). At 1M distinct networks that is one ordered map of about
//! 20 bytes an entry, where a count map beside the blocks took about 43.
//!
//! It takes canonical networks ([`Net`]) and its blocks are canonical too:
//! supernets and siblings of canonical networks are.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::allowlist::Net;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixSet {
    /// The blocks, each marked whether it is a member itself.
    blocks: BTreeMap<Net, bool>,
    /// Members that are not blocks: each lies inside one.
    covered: BTreeSet<Net>,
    /// Members added more than once, by how many times (2 or more).
    extra: HashMap<Net, u32>,
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
    /// The set of `nets`, in any order; a network given `n` times counts `n`.
    /// Built in bulk (sorted once, the maps filled from sorted runs, so
    /// their nodes are full).
    #[must_use]
    pub fn from_nets(nets: impl IntoIterator<Item = Net>) -> Self {
        let mut all: Vec<Net> = nets.into_iter().collect();
        all.sort_unstable();
        let mut extra = HashMap::new();
        let mut members = Vec::with_capacity(all.len());
        for run in all.chunk_by(|a, b| a == b) {
            if run.len() > 1 {
                extra.insert(run[0], u32::try_from(run.len()).unwrap_or(u32::MAX));
            }
            members.push(run[0]);
        }
        drop(all);
        let mut blocks = Net::aggregate(&members);
        blocks.sort_unstable();
        // Both sorted: one merge pass tells members that are blocks from
        // those inside one.
        let mut covered = Vec::new();
        let mut marked = Vec::with_capacity(blocks.len());
        let mut member = members.iter().peekable();
        for block in blocks {
            let mut is_member = false;
            while let Some(&&m) = member.peek() {
                if m == block {
                    is_member = true;
                } else if block.contains(&m.get()) {
                    covered.push(m);
                } else {
                    break;
                }
                member.next();
            }
            marked.push((block, is_member));
        }
        Self {
            blocks: marked.into_iter().collect(),
            covered: covered.into_iter().collect(),
            extra,
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
        self.blocks.keys()
    }

    /// The block that covers `net`, if any. Blocks are disjoint and sorted
    /// by address, so only the last block at or before `net` can cover it.
    #[must_use]
    pub fn covering(&self, net: &Net) -> Option<Net> {
        self.blocks
            .range(..=*net)
            .next_back()
            .map(|(b, _)| *b)
            .filter(|b| b.contains(&net.get()))
    }

    fn is_member(&self, net: &Net) -> bool {
        self.blocks.get(net) == Some(&true) || self.covered.contains(net)
    }

    /// Forget `net` as a member (its blocks stay); whether it was one.
    fn unmark(&mut self, net: &Net) -> bool {
        match self.blocks.get_mut(net) {
            Some(member @ true) => {
                *member = false;
                true
            }
            _ => self.covered.remove(net),
        }
    }

    /// Count `add` in (each network once: an allow list is distinct) and
    /// `release` out (each added before), recording how the blocks moved
    /// in `change`. Additions count first, so a network in both never
    /// leaves on the way.
    pub fn update(
        &mut self,
        add: impl IntoIterator<Item = Net>,
        release: impl IntoIterator<Item = Net>,
        change: &mut Change,
    ) {
        let mut came = Vec::new();
        for net in add {
            if let Some(count) = self.extra.get_mut(&net) {
                *count = count.saturating_add(1);
            } else if self.is_member(&net) {
                self.extra.insert(net, 2);
            } else {
                debug_assert!(!came.contains(&net), "{net} added twice at once");
                came.push(net);
            }
        }
        let mut gone = Vec::new();
        for net in release {
            if let Some(count) = self.extra.get_mut(&net) {
                *count -= 1;
                if *count == 1 {
                    self.extra.remove(&net);
                }
            } else if self.unmark(&net) {
                gone.push(net);
            } else if let Some(at) = came.iter().position(|n| *n == net) {
                // Added by this update (so no member before): cancelled.
                came.swap_remove(at);
            }
        }
        self.remove(&gone, change);
        for net in came {
            self.insert(net, change);
        }
    }

    /// Add `net`, not a member yet: the blocks inside it go, and it merges
    /// upwards while its sibling is a block too (a sibling covered by
    /// smaller blocks cannot happen: they would have merged into it).
    fn insert(&mut self, net: Net, change: &mut Change) {
        if let Some(block) = self.covering(&net) {
            if block == net {
                self.blocks.insert(net, true);
            } else {
                self.covered.insert(net);
            }
            return;
        }
        // Contiguous from `net` on, as in [`Self::members_inside`].
        let inside: Vec<(Net, bool)> = self
            .blocks
            .range(net..)
            .take_while(|(n, _)| net.contains(&n.get()))
            .map(|(n, m)| (*n, *m))
            .collect();
        for (n, is_member) in inside {
            self.blocks.remove(&n);
            change.remove(n);
            if is_member {
                self.covered.insert(n);
            }
        }
        let (mut block, mut is_member) = (net, true);
        while let Some(sibling) = sibling(block) {
            let Some(sibling_member) = self.blocks.remove(&sibling) else {
                break;
            };
            change.remove(sibling);
            if sibling_member {
                self.covered.insert(sibling);
            }
            if is_member {
                self.covered.insert(block);
            }
            // The parent is no member: a member lies inside a block, and
            // no block covered `net`.
            is_member = false;
            block = Net::derived(
                block
                    .supernet()
                    .expect("a network with a sibling has a parent"),
            );
        }
        self.blocks.insert(block, is_member);
        change.add(block);
    }

    /// The members inside `block` (itself first when it is one), in order.
    /// In `Net` order they follow `block` without a gap: a network after it
    /// whose address lies in the block is longer, so inside; a shorter one
    /// could start only at the block's own address, and it sorts before.
    fn members_inside(&self, block: Net) -> Vec<Net> {
        let own = (self.blocks.get(&block) == Some(&true)).then_some(block);
        own.into_iter()
            .chain(
                self.covered
                    .range(block..)
                    .take_while(|n| block.contains(&n.get()))
                    .copied(),
            )
            .collect()
    }

    /// `gone` are networks no longer members: only the blocks that cover one
    /// of them are rebuilt, from the members still inside them.
    fn remove(&mut self, gone: &[Net], change: &mut Change) {
        let affected: BTreeSet<Net> = gone.iter().filter_map(|n| self.covering(n)).collect();
        for block in affected {
            let inside = self.members_inside(block);
            self.blocks.remove(&block);
            change.remove(block);
            for net in Net::aggregate(&inside) {
                let is_member = inside.binary_search(&net).is_ok();
                if is_member {
                    self.covered.remove(&net);
                }
                self.blocks.insert(net, is_member);
                change.add(net);
            }
        }
    }
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

    fn blocks(set: &PrefixSet) -> Vec<String> {
        set.iter().map(ToString::to_string).collect()
    }

    fn add(set: &mut PrefixSet, nets: &[&str]) -> Change {
        let mut c = Change::default();
        set.update(nets.iter().map(|s| net(s)), [], &mut c);
        c
    }

    fn release(set: &mut PrefixSet, nets: &[&str]) -> Change {
        let mut c = Change::default();
        set.update([], nets.iter().map(|s| net(s)), &mut c);
        c
    }

    #[test]
    fn siblings_merge_upwards_and_covered_blocks_go() {
        let mut set = PrefixSet::default();
        add(&mut set, &["192.0.2.0/26"]);
        add(&mut set, &["192.0.2.64/26"]);
        assert_eq!(blocks(&set), ["192.0.2.0/25"]);
        add(&mut set, &["192.0.2.200/32"]);
        add(&mut set, &["192.0.2.128/25"]);
        assert_eq!(blocks(&set), ["192.0.2.0/24"]);
        let c = add(&mut set, &["192.0.2.7/32"]);
        assert_eq!(blocks(&set), ["192.0.2.0/24"], "covered: no change");
        assert!(c.is_empty());
        add(&mut set, &["2001:db8::/33"]);
        add(&mut set, &["2001:db8:8000::/33"]);
        assert_eq!(blocks(&set), ["192.0.2.0/24", "2001:db8::/32"]);
    }

    #[test]
    fn removal_rebuilds_only_from_what_remains() {
        let mut set = PrefixSet::from_nets([net("192.0.2.0/25"), net("192.0.2.128/25")]);
        assert_eq!(blocks(&set), ["192.0.2.0/24"]);
        let c = release(&mut set, &["192.0.2.128/25"]);
        assert_eq!(blocks(&set), ["192.0.2.0/25"]);
        assert_eq!(c.removed, [net("192.0.2.0/24")].into());
        assert_eq!(c.added, [net("192.0.2.0/25")].into());
        release(&mut set, &["192.0.2.0/25"]);
        assert!(set.is_empty());
        assert_eq!(set, PrefixSet::default(), "nothing left behind");
    }

    #[test]
    fn a_network_added_twice_leaves_only_when_released_twice() {
        let mut set = PrefixSet::from_nets([net("192.0.2.0/25"), net("192.0.2.0/25")]);
        let c = add(&mut set, &["192.0.2.0/25"]);
        assert!(c.is_empty());
        release(&mut set, &["192.0.2.0/25"]);
        release(&mut set, &["192.0.2.0/25"]);
        assert_eq!(blocks(&set), ["192.0.2.0/25"]);
        release(&mut set, &["192.0.2.0/25"]);
        assert!(set.is_empty());
    }

    #[test]
    fn a_member_inside_a_block_outlives_the_block() {
        // `/24` holds a `/32` member: taking the `/24` away leaves the `/32`.
        let mut set = PrefixSet::from_nets([net("192.0.2.0/24"), net("192.0.2.9/32")]);
        assert_eq!(blocks(&set), ["192.0.2.0/24"]);
        let c = release(&mut set, &["192.0.2.0/24"]);
        assert_eq!(blocks(&set), ["192.0.2.9/32"]);
        assert_eq!(c.removed, [net("192.0.2.0/24")].into());
        assert_eq!(c.added, [net("192.0.2.9/32")].into());
        // Added and released in one update: no change at all.
        let mut c = Change::default();
        set.update([net("198.51.100.0/24")], [net("198.51.100.0/24")], &mut c);
        assert!(c.is_empty());
        assert_eq!(blocks(&set), ["192.0.2.9/32"]);
    }

    #[test]
    fn a_sibling_that_is_not_canonical_never_merges() {
        // `::fffe:0:0/96`'s sibling would be `::ffff:0:0/96`, which is
        // `0.0.0.0/0` in canonical form: no merge across the families.
        let mut set = PrefixSet::default();
        add(&mut set, &["0.0.0.0/0"]);
        add(&mut set, &["::fffe:0:0/96"]);
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
        /// After any sequence of adds and releases (of networks added
        /// before; the same network any number of times) the set equals a
        /// fresh build from the networks added and not yet released, and
        /// the changes reported take the blocks from where they were to
        /// where they are.
        #[test]
        fn matches_a_fresh_build(
            start in prop::collection::vec(prop::sample::select(POOL.to_vec()), 0..8),
            steps in prop::collection::vec(
                (
                    prop::sample::subsequence(POOL.to_vec(), 0..4),
                    prop::sample::subsequence(POOL.to_vec(), 0..4),
                ),
                1..12,
            ),
        ) {
            let mut wanted: Vec<Net> = start.iter().map(|s| net(s)).collect();
            let mut set = PrefixSet::from_nets(wanted.clone());
            let mut seen: BTreeSet<Net> = set.iter().copied().collect();
            for (adds, releases) in steps {
                let adds: Vec<Net> = adds.iter().map(|s| net(s)).collect();
                wanted.extend(&adds);
                // Only what is wanted (after the adds) can be released.
                let mut releases: Vec<Net> = releases.iter().map(|s| net(s)).collect();
                releases.retain(|n| {
                    wanted.iter().position(|w| w == n).is_some_and(|at| {
                        wanted.swap_remove(at);
                        true
                    })
                });
                let mut change = Change::default();
                set.update(adds, releases, &mut change);
                let fresh = PrefixSet::from_nets(wanted.clone());
                prop_assert_eq!(&set, &fresh);
                for n in &change.removed {
                    prop_assert!(seen.remove(n), "{} removed but never there", n);
                }
                for n in &change.added {
                    prop_assert!(seen.insert(*n), "{} added twice", n);
                }
                prop_assert_eq!(&seen, &set.iter().copied().collect::<BTreeSet<_>>());
            }
        }
    }
}
