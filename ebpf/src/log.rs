//! Rare events to the agent's log through aya-log (the agent forwards them to
//! tracing as `keyfence::datapath`): a dropped packet (debug: the drop-sample
//! ring already gives the named info line), a listener entry naming an
//! unusable slot (`map_error`, warn) and a header the parser could not read
//! (`truncated`/`malformed`, info). Only ever called behind the per-CPU rate
//! limit of `verdict::sample_due` (one event per CPU per 100 ms): a log record
//! costs microseconds, a packet must not.

use aya_log_ebpf::{debug, info, warn};
use keyfence_common::stats::Stat;

/// Log one rate-limited rare event. aya-log-ebpf 0.2 ignores its context
/// argument (records go to its ring buffer), so the programs' contexts need
/// not reach the shared verdict code: `()` stands in.
///
/// A BPF subprogram of its own (kernels >= 4.16 call them) taking scalars
/// that always exist: inlined, or handed a pointer to the flow, the record
/// building made LLVM spill a packet pointer in a way the verifier refuses;
/// handed a field of a flow that may be absent, LLVM read it speculatively
/// from uninitialised stack, which 6.1's verifier refuses. Addresses and
/// ports are in the drop-sample ring's record, which the agent logs.
#[inline(never)]
pub fn event(ifindex: u32, stat: Stat, slot: u32) {
    match stat {
        Stat::DropNotAllowed => debug!(
            (),
            "drop sample: not allowed, listener slot {} ifindex {}", slot, ifindex
        ),
        Stat::DropUnparsed => debug!((), "drop sample: unparsed header, ifindex {}", ifindex),
        Stat::PassMapError => warn!(
            (),
            "map_error: a listener entry names an unusable slot; the packet passes (ifindex {})",
            ifindex
        ),
        Stat::PassMalformed => info!(
            (),
            "malformed header: the parser cannot read the packet, it passes (ifindex {})", ifindex
        ),
        Stat::PassTruncated => info!(
            (),
            "truncated header: the packet ends before the parser's fields, it passes (ifindex {})",
            ifindex
        ),
        _ => {}
    }
}
