//! Drop samples: a rate-limited few dropped packets reach the agent's log through
//! a ring buffer, so operators see *who* is being dropped without a per-packet log.

/// At most one sample per CPU per this interval.
pub const SAMPLE_INTERVAL_NS: u64 = 100_000_000;
/// Drops a CPU lets go by without reading the clock once a drop found the
/// interval still running (a burst): under a flood the clock is read once
/// per this many drops, while drops further apart than the interval each
/// read it and are sampled as before.
pub const SAMPLE_SKIP: u32 = 64;
/// Ring buffer size in bytes (a power of two and a multiple of the page size).
pub const DROP_SAMPLES_BYTES: u32 = 1 << 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropSample {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Destination port, network byte order.
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
    pub ifindex: u32,
    pub policy: u32,
    pub _pad2: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<DropSample>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), byte arrays and u32s, padding explicit.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::DropSample {}
}
