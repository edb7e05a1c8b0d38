//! Per-CPU verdict counters. Every exit of the datapath is counted exactly once,
//! under one [`Stat`], for one (interface slot, listener slot).
//!
//! The metric labels come from [`Stat::verdict`] and [`Stat::reason`], so the
//! kernel's counters and the names users see cannot drift apart.

use crate::policy::MAX_LISTENERS;

/// Interface slots: 0 is "other" (an interface the agent did not attach, or an
/// ifindex beyond [`IFINDEX_SLOTS_CAPACITY`]); the agent assigns `1..`.
pub const MAX_IFACE_SLOTS: u32 = 16;
/// ifindex → interface slot is a plain array (lookups are inlined by the verifier).
pub const IFINDEX_SLOTS_CAPACITY: u32 = 1 << 16;
/// Room per counter block; [`Stat::COUNT`] of them are used.
pub const STAT_SLOTS: usize = 16;
/// Capacity of the counter array: one block per (interface slot, listener slot).
pub const STATS_CAPACITY: u32 = MAX_IFACE_SLOTS * MAX_LISTENERS;

/// Why a packet passed or was dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stat {
    /// Not IPv4/IPv6 (ARP, LLDP, …).
    PassNotIp = 0,
    /// IP, but neither TCP nor UDP (ICMP, `ICMPv6` including ND, ESP, …).
    PassNotTcpUdp = 1,
    /// A non-first fragment: no ports to match on; the shim still decides.
    PassFragment = 2,
    /// No protected listener for this destination address, port and protocol.
    PassNoListener = 3,
    /// The listener is open at packet level (an unrestricted or report-only key, or `early_drop: false`).
    PassListenerOpen = 4,
    /// The source matched a `/32` or `/128` entry.
    PassAllowedExact = 5,
    /// The source matched a shorter prefix.
    PassAllowedPrefix = 6,
    /// A header ended before the packet did: fail open, the shim stays the authority.
    PassTruncated = 7,
    /// A header is malformed (bad IP version, IHL < 5), or the IPv6 extension
    /// chain is longer than the parser walks (more headers than it follows, or
    /// the transport header past the bytes it reads).
    PassMalformed = 8,
    /// A map held something the program cannot use (listener slot out of range).
    PassMapError = 9,
    /// The source is in no allow list of any key the listener accepts.
    DropNotAllowed = 10,
    /// `datapath.unparsed: drop`: the destination is a protected listener's
    /// address and the parser could not reach the transport header (extension
    /// chain too long, truncated or malformed extension or transport header).
    DropUnparsed = 11,
    /// IPv4: the direct tables allow the source (`KF_V4_*`; host entries and
    /// prefixes alike).
    PassAllowedDirect = 12,
}

impl Stat {
    pub const COUNT: usize = 13;
    pub const ALL: [Stat; Self::COUNT] = [
        Stat::PassNotIp,
        Stat::PassNotTcpUdp,
        Stat::PassFragment,
        Stat::PassNoListener,
        Stat::PassListenerOpen,
        Stat::PassAllowedExact,
        Stat::PassAllowedPrefix,
        Stat::PassTruncated,
        Stat::PassMalformed,
        Stat::PassMapError,
        Stat::DropNotAllowed,
        Stat::DropUnparsed,
        Stat::PassAllowedDirect,
    ];

    #[must_use]
    pub const fn is_drop(self) -> bool {
        matches!(self, Stat::DropNotAllowed | Stat::DropUnparsed)
    }

    /// The `verdict` label.
    #[must_use]
    pub const fn verdict(self) -> &'static str {
        if self.is_drop() { "drop" } else { "pass" }
    }

    /// The `reason` label.
    #[must_use]
    pub const fn reason(self) -> &'static str {
        match self {
            Stat::PassNotIp => "not_ip",
            Stat::PassNotTcpUdp => "not_tcp_udp",
            Stat::PassFragment => "fragment",
            Stat::PassNoListener => "no_listener",
            Stat::PassListenerOpen => "listener_open",
            Stat::PassAllowedExact => "allowed_exact",
            Stat::PassAllowedPrefix => "allowed_prefix",
            Stat::PassTruncated => "truncated",
            Stat::PassMalformed => "malformed",
            Stat::PassMapError => "map_error",
            Stat::DropNotAllowed => "not_allowed",
            Stat::DropUnparsed => "unparsed",
            Stat::PassAllowedDirect => "allowed_direct",
        }
    }
}
const _: () = assert!(Stat::COUNT <= STAT_SLOTS);

/// One counter block: packets per [`Stat`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatBlock {
    pub packets: [u64; STAT_SLOTS],
}
const _: () = assert!(core::mem::size_of::<StatBlock>() == 8 * STAT_SLOTS);

/// Index of the counter block for an interface slot and listener slot.
#[must_use]
pub const fn stats_index(iface_slot: u32, listener_slot: u32) -> u32 {
    iface_slot * MAX_LISTENERS + listener_slot
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) array of u64, no padding.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::StatBlock {}
}
