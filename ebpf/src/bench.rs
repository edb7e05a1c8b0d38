//! The bench object (`cargo xtask bench` only; built with this crate's `bench`
//! feature, which agent/build.rs asks for under the agent's `bench` feature):
//! reference programs `keyfence_xdp` is measured beside, on the same parser.
//! They live in an object of their own so that the production object
//! (`main.rs`) and its maps hold only what production runs. Never pinned;
//! only `kf_bench_drop` is attached (by the flood bench, to a veth of its own
//! lab); names in `keyfence_common::bench`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[expect(
    dead_code,
    reason = "the reference programs use the parser, not the unparsed-destination path"
)]
mod parse;
#[cfg(target_arch = "bpf")]
mod runtime;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{BPF_F_NO_PREALLOC, xdp_action},
        macros::{map, xdp},
        maps::{Array, LpmTrie, lpm_trie::Key},
        programs::XdpContext,
    };
    use keyfence_common::policy::{POLICY_BITS, PREFIXES_CAPACITY, PolicyAddr};

    use crate::parse::parse;

    /// Every prefix of a policy in one trie, /32s included (the bench fills
    /// it; tries allocate per entry).
    #[map]
    static KF_BENCH_LPM: LpmTrie<PolicyAddr, u32> =
        LpmTrie::with_max_entries(PREFIXES_CAPACITY, BPF_F_NO_PREALLOC);

    /// Where the floor leaves what it parsed, so that the compiler keeps
    /// every read of the parser: without a use of the flow, it kept only the
    /// Ethernet type check (the floor measured ~7 ns of program).
    #[map]
    static KF_BENCH_SINK: Array<Seen> = Array::with_max_entries(1, 0);

    /// The parsed fields the datapath goes on to use.
    #[repr(C)]
    pub struct Seen {
        src: [u8; 16],
        dst: [u8; 16],
        port: [u8; 2],
        proto: u8,
        v4: u8,
    }

    /// The same parser and nothing else: the floor any program that reads the
    /// packet's addresses pays. The flow goes to `KF_BENCH_SINK` (an array
    /// read the verifier inlines, and the stores), as the real program hands
    /// it to its first map lookup.
    #[xdp]
    pub fn kf_bench_parse(ctx: XdpContext) -> u32 {
        let Ok(flow) = parse(ctx.data(), ctx.data_end()) else {
            return xdp_action::XDP_PASS;
        };
        let Some(seen) = KF_BENCH_SINK.get_ptr_mut(0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: a non-null pointer to the map's one value from the lookup
        // helper; concurrent writers only overwrite each other's bench data.
        #[expect(unsafe_code, reason = "writing a map value")]
        unsafe {
            core::ptr::write_volatile(
                seen,
                Seen {
                    src: flow.src,
                    dst: flow.dst,
                    port: flow.port,
                    proto: flow.proto,
                    v4: u8::from(flow.v4),
                },
            );
        }
        xdp_action::XDP_PASS
    }

    /// The parser and one bare LPM trie lookup of the source under policy 1
    /// (no listener lookup, no counters).
    #[xdp]
    pub fn kf_bench_lpm(ctx: XdpContext) -> u32 {
        match parse(ctx.data(), ctx.data_end()) {
            Ok(flow) => {
                match KF_BENCH_LPM.get(Key::new(POLICY_BITS + 128, PolicyAddr::new(1, flow.src))) {
                    Some(_) => xdp_action::XDP_PASS,
                    None => xdp_action::XDP_DROP,
                }
            }
            Err(_) => xdp_action::XDP_PASS,
        }
    }

    /// Drops every packet without reading it: what a driver's receive path
    /// costs a packet that any XDP program drops (the flood bench's floor for
    /// a refused attempt on veth, which copies each packet first).
    #[xdp]
    pub fn kf_bench_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only by workspace-wide commands with `--features
    // bench`; the object comes from agent/build.rs.
}
