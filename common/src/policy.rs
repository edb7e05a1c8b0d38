//! Listener and allow-list maps: which destinations are protected, and by which
//! policy (the union of allow lists of every key a listener accepts).

/// Listener slots: index 0 means "no listener" (traffic nobody protects); a
/// listener's policy id is its slot, so counters and prefixes share one number.
pub const MAX_LISTENERS: u32 = 64;
/// Capacity of [`crate::map_names::LISTENERS`]; a dual-stack listener takes two entries.
pub const LISTENERS_CAPACITY: u32 = 256;
/// Capacity of the exact-match hash (`/32` and `/128` entries), summed over listeners.
pub const EXACT_CAPACITY: u32 = 1 << 20;
/// Capacity of the LPM trie (all other prefix lengths), summed over listeners.
pub const PREFIXES_CAPACITY: u32 = 1 << 20;

/// Bits of the policy id at the start of every trie key.
pub const POLICY_BITS: u32 = 32;
/// Prefix length of an IPv4 address inside the 128-bit mapped form.
pub const V4_MAPPED_BITS: u32 = 96;

/// Destination a listener protects. `addr` is the bound address, or
/// [`crate::WILDCARD_V4`] / [`crate::WILDCARD_V6`] for wildcard binds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub addr: [u8; 16],
    /// Destination port, network byte order.
    pub port: [u8; 2],
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 20);

impl ListenerKey {
    #[must_use]
    pub const fn new(addr: [u8; 16], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port: port.to_be_bytes(),
            proto,
            _pad: 0,
        }
    }
}

/// Capacity of `KF_PORTS`: one entry per TCP destination port.
pub const PORTS_CAPACITY: u32 = 1 << 16;

/// `KF_PORTS` value bit: some listener on this port binds a specific address,
/// so the packet takes the full listener lookup (exact address, then wildcard).
pub const PORT_SPECIFIC: u32 = 1 << 31;
const _: () = assert!(
    MAX_LISTENERS <= 0x100,
    "slots fit in a byte of a port value"
);

/// A `KF_PORTS` value: what a TCP destination port leads to without any hash
/// lookup. Bits 0-7: slot of the IPv4 wildcard listener (0: none), bit 8: it
/// is open; bits 16-24: the same for IPv6; [`PORT_SPECIFIC`]. 0: nothing
/// listens on the port.
#[must_use]
pub const fn port_value(
    v4: Option<ListenerValue>,
    v6: Option<ListenerValue>,
    specific: bool,
) -> u32 {
    const fn half(v: Option<ListenerValue>) -> u32 {
        match v {
            Some(v) => {
                (v.policy & 0xff)
                    | if v.flags & LISTENER_OPEN != 0 {
                        0x100
                    } else {
                        0
                    }
            }
            None => 0,
        }
    }
    half(v4) | (half(v6) << 16) | if specific { PORT_SPECIFIC } else { 0 }
}

/// The wildcard listener a `KF_PORTS` value gives one family, if any.
#[must_use]
pub const fn port_listener(value: u32, v4: bool) -> Option<ListenerValue> {
    let half = if v4 {
        value & 0x1ff
    } else {
        (value >> 16) & 0x1ff
    };
    let slot = half & 0xff;
    if slot == 0 {
        return None;
    }
    Some(ListenerValue {
        policy: slot,
        flags: if half & 0x100 != 0 { LISTENER_OPEN } else { 0 },
    })
}

/// The listener is open at packet level: some key it accepts is unrestricted or
/// report-only, or `early_drop` is off. Packets are counted, never dropped.
pub const LISTENER_OPEN: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerValue {
    /// Policy id == listener slot, `1..MAX_LISTENERS`.
    pub policy: u32,
    /// `LISTENER_OPEN` or 0.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerValue>() == 8);

/// `(policy id, address)`: the key of the exact-match hash and the data part of
/// the LPM trie key. The policy id is big-endian so that it forms the first 32
/// bits the trie matches on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyAddr {
    pub policy_be: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PolicyAddr>() == 20);

impl PolicyAddr {
    #[must_use]
    pub const fn new(policy: u32, addr: [u8; 16]) -> Self {
        Self {
            policy_be: policy.to_be_bytes(),
            addr,
        }
    }

    #[must_use]
    pub const fn policy(&self) -> u32 {
        u32::from_be_bytes(self.policy_be)
    }
}

/// Value of an allow entry (exact hash and trie).
pub const ALLOWED: u32 = 1;
/// Value of a trie entry that matches but allows nothing. The agent places one at
/// `::ffff:0:0/96` under an IPv6 prefix that covers it (for example `::/0`),
/// because an IPv6 prefix never admits an IPv4 client in the shim (SPEC §3), while
/// in the trie IPv4 sources live inside `::ffff:0:0/96`.
pub const DENIED: u32 = 0;

/// Direct IPv4 tables (a stride-8 trie of plain arrays, DIR-16-8-8): the
/// IPv4 allow decision in two to four array reads the verifier inlines, no
/// hash and no LPM walk. `KF_V4_TOP[a >> 16]`, then up to two
/// `KF_V4_NODES` blocks indexed by the next bytes of the source, end at a
/// set id; `KF_V4_SETS[id]` is a bitmap of the listener slots that allow the
/// source. Entries of the top and the nodes are a set id, or
/// [`V4_NODE`] | a node id.
pub const V4_TOP_CAPACITY: u32 = 1 << 16;
/// Entries of one node block: the next 8 bits of the address.
pub const V4_NODE_FANOUT: usize = 256;
/// Node blocks (1 KiB each). A /16 with anything but one verdict for all of
/// it takes a node; a /24 holding prefixes longer than /24 takes another.
pub const V4_NODES_CAPACITY: u32 = 1 << 14;
/// Distinct listener sets (bitmaps); id 0 is the empty set.
pub const V4_SETS_CAPACITY: u32 = 1 << 16;
/// Top or node entry bit: the rest is a node id, not a set id.
pub const V4_NODE: u32 = 1 << 31;
/// `KF_V4_MODE[0]`: IPv4 packets take the exact hash and the trie (the
/// tables did not fit, or are not written yet).
pub const V4_MODE_TRIE: u32 = 0;
/// `KF_V4_MODE[0]`: IPv4 packets take the direct tables.
pub const V4_MODE_DIRECT: u32 = 1;
const _: () = assert!(
    MAX_LISTENERS <= 64,
    "a listener set is a u64 bitmap of slots"
);

/// A node of the direct IPv4 tables: one entry per value of the next byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4Node {
    pub entries: [u32; V4_NODE_FANOUT],
}
const _: () = assert!(core::mem::size_of::<V4Node>() == 1024);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are repr(C), made of byte arrays and u32s, with no implicit
    // padding (sizes asserted above), so every bit pattern is valid.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::ListenerKey {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::ListenerValue {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::PolicyAddr {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::V4Node {}
}
