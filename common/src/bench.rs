//! The ABI of the bench object (`keyfence-bench-ebpf`, built only with the
//! agent's `bench` feature for `cargo xtask bench`): reference programs the
//! datapath is measured beside. Nothing of it is in the production object.

/// Programs of the bench object; loaded by the bench, and only [`DROP`]
/// attached (to a veth of the flood bench's own).
///
/// [`DROP`]: program_names::DROP
pub mod program_names {
    /// The datapath's parser alone (the floor).
    pub const PARSE: &str = "kf_bench_parse";
    /// The parser and one bare LPM lookup of the source in
    /// [`super::map_names::LPM`].
    pub const LPM: &str = "kf_bench_lpm";
    /// `XDP_DROP` without reading the packet: the receive path's own cost.
    pub const DROP: &str = "kf_bench_drop";
}

/// Maps of the bench object; never pinned.
pub mod map_names {
    /// One LPM trie holding every prefix of a policy, /32s included (the
    /// reference a trie-only design would cost).
    pub const LPM: &str = "KF_BENCH_LPM";
}
