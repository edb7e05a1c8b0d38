//! What a running agent's pinned policy maps hold (`KF_LISTENERS`,
//! `KF_EXACT`, `KF_PREFIXES`), read from outside the agent as
//! `keyfence status` reads them: the packet layer's state, to compare with
//! what the key store says it should be.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

use anyhow::Context as _;
use ipnet::IpNet;
use keyfence::{
    datapath::pin_dir,
    maps::{
        MapSource,
        policy::{KernelPolicyMaps, PolicyBackend as _, PolicyTables},
    },
};
use keyfence_common::policy::{ALLOWED, POLICY_BITS, V4_MAPPED_BITS};

/// Every policy map of the agent pinned under `pin_root`.
pub fn policy_tables(pin_root: &Path) -> anyhow::Result<PolicyTables> {
    let dir = pin_dir(pin_root);
    let maps = KernelPolicyMaps::open(&mut MapSource::Pinned(&dir))
        .with_context(|| format!("opening the policy maps under {}", dir.display()))?;
    maps.read_all()
}

/// An address as the maps store it (IPv4 as `::ffff:a.b.c.d`), back to an
/// [`IpAddr`].
#[must_use]
pub fn addr_of(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The addresses each policy (listener slot) allows, as the smallest set of
/// networks covering them ([`aggregate`]): exact entries and trie entries
/// that allow, whichever the agent chose, so maps compare with allow lists
/// without knowing the layout (the agent merges neighbouring entries).
#[must_use]
pub fn allowed_by_policy(tables: &PolicyTables) -> BTreeMap<u32, BTreeSet<IpNet>> {
    let mut out: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
    for e in &tables.exact {
        let ip = addr_of(e.addr);
        let len = if ip.is_ipv4() { 32 } else { 128 };
        out.entry(e.policy())
            .or_default()
            .extend(IpNet::new(ip, len).ok());
    }
    for ((bits, key), value) in &tables.prefixes {
        if *value != ALLOWED {
            continue;
        }
        let ip = addr_of(key.addr);
        // The trie's length counts the policy id's bits, and an IPv4
        // prefix's mapped bits.
        let len = bits.saturating_sub(POLICY_BITS);
        let len = if ip.is_ipv4() {
            len.saturating_sub(V4_MAPPED_BITS)
        } else {
            len
        };
        out.entry(key.policy())
            .or_default()
            .extend(IpNet::new(ip, u8::try_from(len).unwrap_or(u8::MAX)).ok());
    }
    out.into_iter()
        .map(|(p, nets)| (p, aggregate(nets)))
        .collect()
}

/// The smallest set of networks covering `nets` (adjacent and overlapping
/// ones merged).
pub fn aggregate(nets: impl IntoIterator<Item = IpNet>) -> BTreeSet<IpNet> {
    IpNet::aggregate(&nets.into_iter().collect())
        .into_iter()
        .collect()
}
