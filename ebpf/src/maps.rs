//! The maps the programs share with the agent. Each is pinned by name under the
//! agent's versioned pin directory, so enforcement survives agent restarts.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use keyfence_common::{
    policy::{
        EXACT_CAPACITY, LISTENERS_CAPACITY, ListenerKey, ListenerValue, PORTS_CAPACITY,
        PREFIXES_CAPACITY, PolicyAddr, V4_NODES_CAPACITY, V4_SETS_CAPACITY, V4_TOP_CAPACITY,
        V4Node,
    },
    sample::DROP_SAMPLES_BYTES,
    stats::{IFINDEX_SLOTS_CAPACITY, STATS_CAPACITY, StatBlock},
    unparsed::{UNPARSED_CAPACITY, UnparsedKey},
};

/// Protected destinations `(address, port, proto)` → policy id and flags.
#[map]
pub static KF_LISTENERS: HashMap<ListenerKey, ListenerValue> =
    HashMap::pinned(LISTENERS_CAPACITY, 0);

/// TCP destination port → the wildcard listeners there, or "look up the
/// address" (see `port_value`): most packets need no hash lookup to learn
/// whether, and by which listener, they are protected.
#[map]
pub static KF_PORTS: Array<u32> = Array::pinned(PORTS_CAPACITY, 0);

/// Destination addresses (a family's wildcard: all of them) where a packet whose
/// transport header the parser cannot reach is dropped; empty unless
/// `datapath.unparsed: drop`. Read only on that failure path.
#[map]
pub static KF_UNPARSED: HashMap<UnparsedKey, u32> = HashMap::pinned(UNPARSED_CAPACITY, 0);

/// `/32` and `/128` allow entries per policy: one hash lookup before the trie.
#[map]
pub static KF_EXACT: HashMap<PolicyAddr, u32> = HashMap::pinned(EXACT_CAPACITY, BPF_F_NO_PREALLOC);

/// Every other allow prefix per policy, keyed `(policy id, address)`.
#[map]
pub static KF_PREFIXES: LpmTrie<PolicyAddr, u32> = LpmTrie::pinned(PREFIXES_CAPACITY, 0);

/// Per-CPU packet counters, one block per (interface slot, listener slot).
#[map]
pub static KF_STATS: PerCpuArray<StatBlock> = PerCpuArray::pinned(STATS_CAPACITY, 0);

/// ifindex → interface slot for the counters (0 = an interface keyfence does not know).
#[map]
pub static KF_IFINDEX_SLOTS: Array<u32> = Array::pinned(IFINDEX_SLOTS_CAPACITY, 0);

/// Rate-limited samples of dropped packets for the agent's log.
#[map]
pub static KF_DROP_SAMPLES: RingBuf = RingBuf::pinned(DROP_SAMPLES_BYTES, 0);

/// Per-CPU time of the last drop sample (ns since boot), for the rate limit.
#[map]
pub static KF_SAMPLE_CLOCK: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Per-CPU drops still to let go by without reading the clock (see
/// `SAMPLE_SKIP`). Added beside `KF_SAMPLE_CLOCK` rather than widening its
/// value, so the pinned layout stays the same (see `LAYOUT_VERSION`).
#[map]
pub static KF_SAMPLE_SKIP: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

/// Which structure decides IPv4 sources: `V4_MODE_DIRECT` (the `KF_V4_*`
/// tables below) or `V4_MODE_TRIE` (`KF_EXACT` and `KF_PREFIXES`, which the
/// agent keeps complete either way: IPv6 and the fallback use them).
#[map]
pub static KF_V4_MODE: Array<u32> = Array::pinned(1, 0);

/// Direct IPv4 tables, level 1: the source's top 16 bits → a set id or a
/// node (`V4_NODE`). Memory-mappable: the agent writes single entries with
/// one aligned 32-bit store each, which is what makes its ordering hold.
#[map]
pub static KF_V4_TOP: Array<u32> = Array::pinned(V4_TOP_CAPACITY, BPF_F_MMAPABLE);

/// Direct IPv4 tables, levels 2 and 3: 256-entry blocks indexed by the
/// source's third byte (under a top entry), then its fourth (under a level-2
/// entry).
#[map]
pub static KF_V4_NODES: Array<V4Node> = Array::pinned(V4_NODES_CAPACITY, BPF_F_MMAPABLE);

/// Set id → bitmap of the listener slots that allow the source.
#[map]
pub static KF_V4_SETS: Array<u64> = Array::pinned(V4_SETS_CAPACITY, BPF_F_MMAPABLE);
