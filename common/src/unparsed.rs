//! `KF_UNPARSED`: the destination addresses where `datapath.unparsed: drop`
//! drops packets whose transport header the parser cannot reach. The setting
//! lives in the map's contents: with `pass` (the default) the agent keeps it
//! empty, with `drop` it holds the address of every protected listener (one
//! with `early_drop` that is not open), a wildcard bind as that family's
//! wildcard address ([`crate::WILDCARD_V4`], [`crate::WILDCARD_V6`]), which
//! stands for every address of the family.

use crate::policy::LISTENERS_CAPACITY;

/// Capacity: at most one entry per listener map entry.
pub const UNPARSED_CAPACITY: u32 = LISTENERS_CAPACITY;

/// A protected destination address, 16 bytes, IPv4 mapped (as in
/// [`crate::policy::ListenerKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnparsedKey {
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<UnparsedKey>() == 16);

/// The value of every entry (the key's presence is what counts).
pub const UNPARSED_DROP: u32 = 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), one byte array, no padding (size asserted above).
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::UnparsedKey {}
}
