//! The ABI shared by the kernel programs (`keyfence-ebpf`) and the agent.
//!
//! Everything here crosses the user/kernel boundary through BPF maps, so every type
//! is `#[repr(C)]`, made of fixed-width integers and byte arrays only, padded
//! explicitly, and its size is asserted at compile time. Addresses are 16 bytes in
//! network order; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so one trie holds
//! both families and a v4-mapped IPv6 source matches its IPv4 entry (SPEC §3).
#![no_std]

#[cfg(feature = "bench")]
pub mod bench;
pub mod policy;
pub mod sample;
pub mod stats;
pub mod unparsed;

/// Bumped whenever a map's key, value or capacity changes. The agent pins under
/// `<pin_path>/v<LAYOUT_VERSION>/`, so an upgraded agent never reuses a map whose
/// layout it does not understand (aya does not check pinned maps' layouts).
/// A map *added* to the set is not a change of layout: an agent that adopts
/// pins without it creates and pins it (aya does for every map of the object),
/// and an older agent ignores it, so upgrades keep their pinned links
/// (`KF_UNPARSED` came this way, with `Stat::DropUnparsed` in a free slot of
/// the unchanged `StatBlock`).
///
/// 2: the direct IPv4 tables (`KF_V4_*`). Added maps alone would not need a
/// bump, but an older agent adopting these pins would keep a program that
/// reads `KF_V4_MODE` while it updates only the trie: the direct tables
/// would go stale under it.
pub const LAYOUT_VERSION: u32 = 2;

/// Map names as they appear in the object file and under the pin directory
/// (the bench object's are in `bench`).
pub mod map_names {
    pub const LISTENERS: &str = "KF_LISTENERS";
    pub const EXACT: &str = "KF_EXACT";
    pub const PREFIXES: &str = "KF_PREFIXES";
    pub const STATS: &str = "KF_STATS";
    pub const IFINDEX_SLOTS: &str = "KF_IFINDEX_SLOTS";
    pub const DROP_SAMPLES: &str = "KF_DROP_SAMPLES";
    pub const SAMPLE_CLOCK: &str = "KF_SAMPLE_CLOCK";
    pub const SAMPLE_SKIP: &str = "KF_SAMPLE_SKIP";
    pub const PORTS: &str = "KF_PORTS";
    pub const UNPARSED: &str = "KF_UNPARSED";
    pub const V4_MODE: &str = "KF_V4_MODE";
    pub const V4_TOP: &str = "KF_V4_TOP";
    pub const V4_NODES: &str = "KF_V4_NODES";
    pub const V4_SETS: &str = "KF_V4_SETS";
    /// Every map the agent pins, in the order it checks their layouts.
    pub const ALL: [&str; 14] = [
        LISTENERS,
        PORTS,
        UNPARSED,
        EXACT,
        PREFIXES,
        STATS,
        IFINDEX_SLOTS,
        DROP_SAMPLES,
        SAMPLE_CLOCK,
        SAMPLE_SKIP,
        V4_MODE,
        V4_TOP,
        V4_NODES,
        V4_SETS,
    ];
}

/// Program names in the object file (the bench object's are in `bench`).
pub mod program_names {
    pub const XDP: &str = "keyfence_xdp";
    pub const TC: &str = "keyfence_tc";
}

/// `IPPROTO_TCP`, as found in the IPv4 protocol / IPv6 next-header field.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// The 16-byte form of an IPv4 address: `::ffff:a.b.c.d`.
#[must_use]
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Wildcard listener address for IPv4 packets (`0.0.0.0`, stored mapped).
pub const WILDCARD_V4: [u8; 16] = ipv4_mapped([0, 0, 0, 0]);
/// Wildcard listener address for IPv6 packets (`::`).
pub const WILDCARD_V6: [u8; 16] = [0; 16];
