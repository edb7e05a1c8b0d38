//! `KF_UNPARSED`: the protected destination addresses where, under
//! `datapath.unparsed: drop`, a packet whose transport header the parser
//! cannot reach is dropped. With `pass` the map is empty.
//!
//! An address is protected when a listener with `early_drop` that is not open
//! binds it; a wildcard bind protects every address of its family (`[::]` both
//! families, as in `KF_LISTENERS`). The map only changes which *unparsed*
//! packets drop, so any order of writes keeps "never drop what passes before
//! and after" (every intermediate set lies inside the union of the two);
//! removals still go first and additions last, the writer's widen-then-narrow
//! rule (see `maps::policy`).

use std::collections::BTreeSet;

use anyhow::Context as _;
use aya::maps::{HashMap, MapData};
use keyfence_common::{
    map_names,
    unparsed::{UNPARSED_DROP, UnparsedKey},
};

use crate::{
    config::Unparsed,
    maps::{MapSource, policy::listener_keys},
    policy::{Access, CompiledPolicy},
};

/// The addresses `policy` protects: those of its restricted listeners.
#[must_use]
pub fn protected(policy: &CompiledPolicy) -> BTreeSet<UnparsedKey> {
    policy
        .listeners
        .iter()
        .filter(|l| matches!(l.access, Access::Restricted(_)))
        .flat_map(|l| listener_keys(l.bind))
        .map(|k| UnparsedKey { addr: k.addr })
        .collect()
}

/// What `KF_UNPARSED` should hold for `protected` addresses under `mode`.
#[must_use]
pub fn wanted(protected: &BTreeSet<UnparsedKey>, mode: Unparsed) -> BTreeSet<UnparsedKey> {
    match mode {
        Unparsed::Pass => BTreeSet::new(),
        Unparsed::Drop => protected.clone(),
    }
}

/// Where the writer's operations go: the kernel map, or memory in tests
/// (`maps::memory`).
pub trait UnparsedBackend {
    fn put(&mut self, key: &UnparsedKey) -> anyhow::Result<()>;
    fn del(&mut self, key: &UnparsedKey) -> anyhow::Result<()>;
    /// Everything stored (read once, to adopt pinned maps on start).
    fn read_all(&self) -> anyhow::Result<BTreeSet<UnparsedKey>>;
}

/// The kernel's `KF_UNPARSED`.
pub type KernelUnparsed = HashMap<MapData, UnparsedKey, u32>;

impl UnparsedBackend for KernelUnparsed {
    fn put(&mut self, key: &UnparsedKey) -> anyhow::Result<()> {
        self.insert(key, UNPARSED_DROP, 0)
            .context("writing KF_UNPARSED")
    }
    fn del(&mut self, key: &UnparsedKey) -> anyhow::Result<()> {
        self.remove(key).context("removing from KF_UNPARSED")
    }
    fn read_all(&self) -> anyhow::Result<BTreeSet<UnparsedKey>> {
        self.keys()
            .map(|k| k.context("iterating KF_UNPARSED"))
            .collect()
    }
}

/// Moves `KF_UNPARSED` from one set of addresses to the next.
pub struct UnparsedWriter<B> {
    backend: B,
    /// What the map holds (as written, or as adopted).
    held: BTreeSet<UnparsedKey>,
}

impl UnparsedWriter<KernelUnparsed> {
    /// Adopt the kernel's `KF_UNPARSED` from `maps`.
    pub fn open(maps: &mut MapSource<'_>) -> anyhow::Result<Self> {
        Self::adopt(maps.map(map_names::UNPARSED)?)
    }
}

impl<B: UnparsedBackend> UnparsedWriter<B> {
    /// Adopt what the map holds now (a previous agent's set after a restart).
    pub fn adopt(backend: B) -> anyhow::Result<Self> {
        let held = backend
            .read_all()
            .context("reading the pinned KF_UNPARSED")?;
        Ok(Self { backend, held })
    }

    #[must_use]
    pub fn held(&self) -> &BTreeSet<UnparsedKey> {
        &self.held
    }

    #[must_use]
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Remove every held address `want` does not hold (fewer drops): the step
    /// before the listeners change. Returns how many went.
    pub fn widen_to(&mut self, want: &BTreeSet<UnparsedKey>) -> anyhow::Result<usize> {
        let gone: Vec<UnparsedKey> = self.held.difference(want).copied().collect();
        for key in &gone {
            self.backend.del(key)?;
            self.held.remove(key);
        }
        Ok(gone.len())
    }

    /// Add every address of `want` not held yet (more drops): the step after
    /// the listeners changed. Returns how many came.
    pub fn narrow_to(&mut self, want: &BTreeSet<UnparsedKey>) -> anyhow::Result<usize> {
        let came: Vec<UnparsedKey> = want.difference(&self.held).copied().collect();
        for key in &came {
            self.backend.put(key)?;
            self.held.insert(*key);
        }
        Ok(came.len())
    }
}

#[cfg(test)]
mod tests {
    use keyfence_common::{WILDCARD_V4, WILDCARD_V6, ipv4_mapped, unparsed::UNPARSED_CAPACITY};

    use super::*;
    use crate::policy::ListenerPolicy;

    fn listener(name: &str, bind: &str, access: Access) -> ListenerPolicy {
        ListenerPolicy {
            name: name.into(),
            bind: bind.parse().unwrap(),
            access,
        }
    }

    fn key(addr: [u8; 16]) -> UnparsedKey {
        UnparsedKey { addr }
    }

    fn policy() -> CompiledPolicy {
        CompiledPolicy {
            listeners: vec![
                listener(
                    "api",
                    "[::]:8443",
                    Access::Restricted(vec!["192.0.2.0/24".parse().unwrap()]),
                ),
                listener(
                    "admin",
                    "192.0.2.1:22",
                    Access::Restricted(vec!["203.0.113.0/30".parse().unwrap()]),
                ),
                listener(
                    "v6",
                    "[2001:db8::1]:9443",
                    // Restricted to nothing: still protected.
                    Access::Restricted(vec![]),
                ),
                listener("open", "198.51.100.1:8444", Access::Open),
                listener("open6", "[2001:db8::2]:8444", Access::Open),
            ],
            next_change: None,
        }
    }

    #[test]
    fn restricted_listeners_protect_their_addresses_wildcards_their_family() {
        let got = protected(&policy());
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let want: BTreeSet<UnparsedKey> = [
            key(WILDCARD_V6),
            key(WILDCARD_V4),
            key(ipv4_mapped([192, 0, 2, 1])),
            key(v6.octets()),
        ]
        .into();
        assert_eq!(got, want);
        // Open listeners protect nothing, an IPv4 wildcard only IPv4.
        let only_open = CompiledPolicy {
            listeners: vec![
                listener("open", "[::]:1", Access::Open),
                listener("w4", "0.0.0.0:2", Access::Restricted(vec![])),
            ],
            next_change: None,
        };
        assert_eq!(protected(&only_open), [key(WILDCARD_V4)].into());
    }

    #[test]
    fn pass_holds_nothing_drop_holds_every_protected_address() {
        let p = protected(&policy());
        assert!(wanted(&p, Unparsed::Pass).is_empty());
        assert_eq!(wanted(&p, Unparsed::Drop), p);
    }

    #[test]
    fn writer_widens_then_narrows_and_adopts_what_is_pinned() {
        let a = key(ipv4_mapped([192, 0, 2, 1]));
        let b = key(ipv4_mapped([192, 0, 2, 2]));
        let c = key(WILDCARD_V6);
        let mut w = UnparsedWriter::adopt(BTreeSet::from([a, b])).unwrap();
        assert_eq!(w.held(), &BTreeSet::from([a, b]));
        let want = BTreeSet::from([b, c]);
        // Widening only removes: nothing outside before ∪ after ever appears.
        assert_eq!(w.widen_to(&want).unwrap(), 1);
        assert_eq!(w.backend.read_all().unwrap(), BTreeSet::from([b]));
        assert_eq!(w.narrow_to(&want).unwrap(), 1);
        assert_eq!(w.backend.read_all().unwrap(), want);
        // Again: nothing to write.
        assert_eq!(w.widen_to(&want).unwrap() + w.narrow_to(&want).unwrap(), 0);
        // Back to pass: the map empties.
        assert_eq!(w.widen_to(&BTreeSet::new()).unwrap(), 2);
        assert!(w.backend.read_all().unwrap().is_empty());
    }

    #[test]
    fn a_failed_write_leaves_what_was_written_held() {
        let full: BTreeSet<UnparsedKey> = (0..UNPARSED_CAPACITY)
            .map(|i| {
                let mut addr = [0u8; 16];
                addr[12..].copy_from_slice(&i.to_be_bytes());
                key(addr)
            })
            .collect();
        let mut w = UnparsedWriter::adopt(full.clone()).unwrap();
        let extra = key(WILDCARD_V4);
        let mut want = full.clone();
        want.insert(extra);
        assert!(w.narrow_to(&want).is_err());
        assert_eq!(w.held(), &full);
    }
}
