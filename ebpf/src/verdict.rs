//! From a parsed flow to a counted verdict (SPEC §7): port table (then, where a
//! listener binds a specific address, listener lookup: exact address, then the
//! family's wildcard) → for IPv4 in direct mode the direct tables, otherwise
//! exact-match hash → LPM trie → drop.
//!
//! Fail-open: every outcome other than [`Stat::DropNotAllowed`] passes, including
//! parse failures and unusable map contents. The one exception is an operator's
//! choice: with `datapath.unparsed: drop` the agent fills `KF_UNPARSED`, and a
//! packet to one of its addresses whose transport header the parser could not
//! reach is dropped ([`Stat::DropUnparsed`]): otherwise a long enough extension
//! chain would carry any source past the datapath to the shim. The shim behind
//! the datapath is the authority on every request; the datapath only sheds
//! packets that no key on the listener could ever accept, so when in doubt it
//! must let the packet through.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use keyfence_common::{
    PROTO_TCP, WILDCARD_V4, WILDCARD_V6,
    policy::{
        ALLOWED, LISTENER_OPEN, ListenerKey, ListenerValue, MAX_LISTENERS, POLICY_BITS,
        PORT_SPECIFIC, PolicyAddr, V4_MODE_DIRECT, V4_NODE, port_listener,
    },
    sample::{DropSample, SAMPLE_INTERVAL_NS, SAMPLE_SKIP},
    stats::{STAT_SLOTS, Stat, stats_index},
    unparsed::UnparsedKey,
};

use crate::{
    maps::{
        KF_DROP_SAMPLES, KF_EXACT, KF_IFINDEX_SLOTS, KF_LISTENERS, KF_PORTS, KF_PREFIXES,
        KF_SAMPLE_CLOCK, KF_SAMPLE_SKIP, KF_STATS, KF_UNPARSED, KF_V4_MODE, KF_V4_NODES,
        KF_V4_SETS, KF_V4_TOP,
    },
    parse::{Flow, addresses, parse},
};

/// The outcome for one packet: which listener slot it is counted under, and why.
pub struct Decision {
    pub slot: u32,
    pub stat: Stat,
}

/// Parse, decide and count: true when the packet is to be dropped. Never
/// fails: failures are decisions to pass (see module doc), unless
/// `KF_UNPARSED` protects the destination of a packet whose transport header
/// was out of reach. Such a drop is counted under listener slot 0 (without a
/// port the listener is unknown), its flow has port 0.
///
/// Each outcome is recorded where it is decided, with the flow only where
/// there is one: carrying a flow out of here for every packet (a blank one
/// for packets the parser gave up on) cost each packet about 20 stack stores
/// per branch of the parser, more than the lookups themselves.
#[inline(always)]
pub fn judge(data: usize, end: usize, ifindex: u32) -> bool {
    match parse(data, end) {
        Ok(flow) => {
            let decision = decide(&flow);
            count(ifindex, &decision);
            if decision.stat.is_drop() {
                sample_drop_event(ifindex, &decision, &flow);
                true
            } else {
                false
            }
        }
        Err(failure) => {
            if let Some(flow) = failure.unreached.and_then(|ip| addresses(data, end, ip))
                && unparsed_drop(&flow)
            {
                let decision = Decision {
                    slot: 0,
                    stat: Stat::DropUnparsed,
                };
                count(ifindex, &decision);
                sample_drop_event(ifindex, &decision, &flow);
                return true;
            }
            let decision = Decision {
                slot: 0,
                stat: failure.stat,
            };
            count(ifindex, &decision);
            // Malformed and truncated headers (every parse failure that is
            // not simply "not IP" or "not TCP/UDP") are rare events.
            if matches!(decision.stat, Stat::PassMalformed | Stat::PassTruncated) && sample_due() {
                crate::log::event(ifindex, decision.stat, decision.slot);
            }
            false
        }
    }
}

/// Is the destination in `KF_UNPARSED`: its address, else its family's wildcard
/// (the same two lookups that find a listener)?
#[inline(always)]
fn unparsed_drop(flow: &Flow) -> bool {
    let mut key = UnparsedKey { addr: flow.dst };
    if KF_UNPARSED.get_ptr(&key).is_some() {
        return true;
    }
    key.addr = if flow.v4 { WILDCARD_V4 } else { WILDCARD_V6 };
    KF_UNPARSED.get_ptr(&key).is_some()
}

#[inline(always)]
fn decide(flow: &Flow) -> Decision {
    // TCP: the port table says whether anything listens there and, unless some
    // listener binds a specific address, which listener it is (an array read,
    // no hash). Other protocols, and ports with specific binds, look up the
    // address. A missing entry (cannot happen) also takes the full lookup.
    let port = if flow.proto == PROTO_TCP {
        KF_PORTS
            .get(u32::from(u16::from_be_bytes(flow.port)))
            .copied()
            .unwrap_or(PORT_SPECIFIC)
    } else {
        PORT_SPECIFIC
    };
    let listener = match port {
        0 => None,
        p if p & PORT_SPECIFIC == 0 => port_listener(p, flow.v4),
        _ => lookup_listener(flow),
    };
    match listener {
        Some(listener) => verdict_for(flow, listener),
        None => Decision {
            slot: 0,
            stat: Stat::PassNoListener,
        },
    }
}

/// The listener of `flow` from `KF_LISTENERS`: its exact address, else the
/// family's wildcard.
#[inline(always)]
fn lookup_listener(flow: &Flow) -> Option<ListenerValue> {
    let mut key = ListenerKey {
        addr: flow.dst,
        port: flow.port,
        proto: flow.proto,
        _pad: 0,
    };
    let listener = match KF_LISTENERS.get_ptr(&key) {
        Some(v) => v,
        None => {
            key.addr = if flow.v4 { WILDCARD_V4 } else { WILDCARD_V6 };
            KF_LISTENERS.get_ptr(&key)?
        }
    };
    // SAFETY: a non-null pointer to a map value returned by the lookup helper.
    #[expect(unsafe_code, reason = "reading a map value")]
    Some(unsafe { *listener })
}

/// The decision for a packet of a protected listener.
#[inline(always)]
fn verdict_for(flow: &Flow, listener: ListenerValue) -> Decision {
    let slot = listener.policy;
    if slot == 0 || slot >= MAX_LISTENERS {
        return Decision {
            slot: 0,
            stat: Stat::PassMapError,
        };
    }
    if listener.flags & LISTENER_OPEN != 0 {
        return Decision {
            slot,
            stat: Stat::PassListenerOpen,
        };
    }
    // IPv4 in direct mode: array reads only. A table entry the program
    // cannot use (cannot happen) falls through to the trie, which the agent
    // keeps complete in both modes.
    if flow.v4
        && let Some(&V4_MODE_DIRECT) = KF_V4_MODE.get(0)
        && let Some(allowed) = direct_v4(&flow.src)
    {
        return Decision {
            slot,
            stat: if (allowed >> slot) & 1 != 0 {
                Stat::PassAllowedDirect
            } else {
                Stat::DropNotAllowed
            },
        };
    }
    let entry = PolicyAddr::new(slot, flow.src);
    if KF_EXACT.get_ptr(&entry).is_some() {
        return Decision {
            slot,
            stat: Stat::PassAllowedExact,
        };
    }
    // The longest matching prefix decides; a `DENIED` marker stops an IPv6 prefix
    // such as `::/0` from also covering IPv4 sources (stored as `::ffff:0:0/96`).
    if let Some(&ALLOWED) = KF_PREFIXES.get(Key::new(POLICY_BITS + 128, entry)) {
        return Decision {
            slot,
            stat: Stat::PassAllowedPrefix,
        };
    }
    Decision {
        slot,
        stat: Stat::DropNotAllowed,
    }
}

/// The listener slots that allow the IPv4 source `src` (mapped form), from
/// the direct tables: the top entry of its /16, then at most two nodes, then
/// the set. `None` for an entry that points nowhere usable.
#[inline(always)]
fn direct_v4(src: &[u8; 16]) -> Option<u64> {
    let a = u32::from_be_bytes([src[12], src[13], src[14], src[15]]);
    let mut v = *KF_V4_TOP.get(a >> 16)?;
    if v & V4_NODE != 0 {
        v = KF_V4_NODES.get(v & !V4_NODE)?.entries[((a >> 8) & 0xff) as usize];
        if v & V4_NODE != 0 {
            v = KF_V4_NODES.get(v & !V4_NODE)?.entries[(a & 0xff) as usize];
            if v & V4_NODE != 0 {
                return None;
            }
        }
    }
    KF_V4_SETS.get(v).copied()
}

/// Count the decision; a parsed packet's map error goes to the agent's log
/// (rate limited) too, the one rare event that is not a drop and has a flow.
#[inline(always)]
fn count(ifindex: u32, decision: &Decision) {
    let iface_slot = KF_IFINDEX_SLOTS.get(ifindex).copied().unwrap_or(0);
    if let Some(block) = KF_STATS.get_ptr_mut(stats_index(iface_slot, decision.slot)) {
        // SAFETY: per-CPU value pointer from the lookup helper; the index is masked
        // into the array's bounds.
        #[expect(unsafe_code, reason = "updating a per-CPU counter in place")]
        unsafe {
            (*block).packets[(decision.stat as usize) & (STAT_SLOTS - 1)] += 1;
        }
    }
    if matches!(decision.stat, Stat::PassMapError) && sample_due() {
        crate::log::event(ifindex, decision.stat, decision.slot);
    }
}

/// A drop's sample: the drop-sample ring and the aya-log record, both behind
/// one per-CPU rate limit.
#[inline(always)]
fn sample_drop_event(ifindex: u32, decision: &Decision, flow: &Flow) {
    if sample_due() {
        sample_drop(ifindex, decision.slot, flow);
        crate::log::event(ifindex, decision.stat, decision.slot);
    }
}

/// At most one sample (a drop sample or an aya-log record) per CPU per
/// `SAMPLE_INTERVAL_NS`. The coarse clock (a tick's resolution) is plenty for
/// a 100 ms limit and costs a load instead of a clock read on every drop:
/// drops got 30-40% cheaper. A rare event that finds the interval still
/// running skips the clock for the next `SAMPLE_SKIP` events (a per-CPU array
/// read the verifier inlines), so a flood reads it once per `SAMPLE_SKIP`;
/// the limit only gets stricter.
#[inline(always)]
fn sample_due() -> bool {
    let Some(skip) = KF_SAMPLE_SKIP.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value pointer from the lookup helper; no other CPU touches it.
    #[expect(unsafe_code, reason = "per-CPU skip count")]
    unsafe {
        if *skip > 0 {
            *skip -= 1;
            return false;
        }
    }
    // SAFETY: helper without arguments.
    #[expect(unsafe_code, reason = "BPF helper call")]
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(last) = KF_SAMPLE_CLOCK.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value pointers from the lookup helper; no other CPU
    // touches them.
    #[expect(unsafe_code, reason = "per-CPU rate-limit clock")]
    unsafe {
        if now.wrapping_sub(*last) < SAMPLE_INTERVAL_NS {
            *skip = SAMPLE_SKIP;
            return false;
        }
        *last = now;
    }
    true
}

/// Send a drop sample (the caller checked [`sample_due`]).
#[inline(always)]
fn sample_drop(ifindex: u32, slot: u32, flow: &Flow) {
    let sample = DropSample {
        src: flow.src,
        dst: flow.dst,
        port: flow.port,
        proto: flow.proto,
        _pad: 0,
        ifindex,
        policy: slot,
        _pad2: [0; 4],
    };
    // A full ring buffer only loses a sample; the drop itself is already counted.
    let _ = KF_DROP_SAMPLES.output::<DropSample>(&sample, 0);
}
