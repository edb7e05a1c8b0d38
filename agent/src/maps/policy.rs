//! The policy maps (`KF_LISTENERS`, `KF_EXACT`, `KF_PREFIXES`) and the writer that
//! moves them from one compiled policy to the next.
//!
//! Changes are applied as a diff, ordered so that no packet ever sees a state that
//! drops a source allowed both before and after the change:
//! 1. add new allow entries (and turn deny markers into allows);
//! 2. insert or update listeners (a new or newly restricted listener goes live
//!    only once its entries are in place);
//! 3. remove listeners that are gone;
//! 4. remove entries no longer wanted (and turn allows into deny markers).
//!
//! At every step the allowed set is a superset of (before ∩ after).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, IterableMap as _, LpmTrie, MapData, lpm_trie::Key};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use keyfence_common::{
    PROTO_TCP, WILDCARD_V4, WILDCARD_V6, ipv4_mapped, map_names,
    policy::{
        ALLOWED, DENIED, LISTENER_OPEN, ListenerKey, ListenerValue, MAX_LISTENERS, POLICY_BITS,
        PolicyAddr, V4_MAPPED_BITS, port_value,
    },
};

use crate::{
    allowlist::Net,
    config::MapCapacity,
    maps::{
        MapSource,
        direct::{DirectBackend, DirectTables, DirectWriter, KernelDirectMaps, Pieces, V4Path},
        packed::PackedNets,
    },
    policy::{Access, CompiledPolicy},
    prefixset::Change,
    sys::MapBatch,
};

/// A change the datapath cannot hold: refused before anything is written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error(
        "datapath exact-match map full: {limit} entries (/32 and /128 addresses; \
         the change needs {needed})"
    )]
    Exact { needed: i64, limit: u32 },
    #[error("datapath prefix map full: {limit} entries (the change needs {needed})")]
    Prefixes { needed: i64, limit: u32 },
    #[error("more than {limit} listeners: the datapath has no free slot")]
    Listeners { limit: u32 },
}

impl CapacityError {
    /// The limit that was reached, in entries (listeners for `Listeners`).
    #[must_use]
    pub fn limit(&self) -> u32 {
        match self {
            CapacityError::Exact { limit, .. }
            | CapacityError::Prefixes { limit, .. }
            | CapacityError::Listeners { limit } => *limit,
        }
    }

    /// Which map is full: `exact`, `prefixes` or `listeners`.
    #[must_use]
    pub fn map(&self) -> &'static str {
        match self {
            CapacityError::Exact { .. } => "exact",
            CapacityError::Prefixes { .. } => "prefixes",
            CapacityError::Listeners { .. } => "listeners",
        }
    }
}

/// A trie entry: `(prefix length in bits including the policy id, key)`.
pub type PrefixKey = (u32, PolicyAddr);

/// The contents of the policy maps (what the kernel holds, or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    pub listeners: BTreeMap<ListenerKey, ListenerValue>,
    /// `KF_PORTS`, non-zero entries: derived from `listeners` (see [`ports_of`]).
    pub ports: BTreeMap<u16, u32>,
    pub exact: BTreeSet<PolicyAddr>,
    pub prefixes: BTreeMap<PrefixKey, u32>,
    /// The direct IPv4 tables (`maps::direct`).
    pub direct: DirectTables,
}

/// Where the writer's operations go: the kernel maps ([`KernelPolicyMaps`]),
/// or memory in tests (`maps::memory`).
pub trait PolicyBackend {
    fn put_listener(&mut self, key: &ListenerKey, value: &ListenerValue) -> anyhow::Result<()>;
    fn del_listener(&mut self, key: &ListenerKey) -> anyhow::Result<()>;
    /// Set a `KF_PORTS` entry (0 clears it).
    fn put_port(&mut self, port: u16, value: u32) -> anyhow::Result<()>;
    fn put_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()>;
    fn del_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()>;
    fn put_prefix(&mut self, key: &PrefixKey, value: u32) -> anyhow::Result<()>;
    fn del_prefix(&mut self, key: &PrefixKey) -> anyhow::Result<()>;
    /// [`Self::put_exact`] for each key, in order (the kernel maps take a
    /// run in one `bpf(2)` call: a first apply of a million addresses makes
    /// a few hundred calls, not a million).
    fn put_exact_many(&mut self, keys: &[PolicyAddr]) -> anyhow::Result<()> {
        keys.iter().try_for_each(|k| self.put_exact(k))
    }
    /// [`Self::del_exact`] for each key, in order.
    fn del_exact_many(&mut self, keys: &[PolicyAddr]) -> anyhow::Result<()> {
        keys.iter().try_for_each(|k| self.del_exact(k))
    }
    /// [`Self::put_prefix`] for each key with its value, in order.
    fn put_prefix_many(&mut self, keys: &[PrefixKey], values: &[u32]) -> anyhow::Result<()> {
        keys.iter()
            .zip(values)
            .try_for_each(|(k, &v)| self.put_prefix(k, v))
    }
    /// [`Self::del_prefix`] for each key, in order.
    fn del_prefix_many(&mut self, keys: &[PrefixKey]) -> anyhow::Result<()> {
        keys.iter().try_for_each(|k| self.del_prefix(k))
    }
    /// Everything currently stored (used once, to adopt pinned maps on start;
    /// the direct tables are left out, see [`Self::read_direct`]).
    fn read_all(&self) -> anyhow::Result<PolicyTables>;
    /// The direct IPv4 tables, where this backend has them.
    fn direct(&mut self) -> Option<&mut dyn DirectBackend> {
        None
    }
    /// What the direct IPv4 tables hold (for the reference model).
    fn read_direct(&self) -> anyhow::Result<DirectTables> {
        Ok(DirectTables::default())
    }
}

/// The listener-key(s) a bind address is reached by. `[::]:P` is dual-stack, so
/// it is reached by IPv4 packets too; `0.0.0.0:P` only by IPv4.
#[must_use]
pub fn listener_keys(bind: SocketAddr) -> Vec<ListenerKey> {
    let port = bind.port();
    let addrs: Vec<[u8; 16]> = match crate::allowlist::fold_ip(bind.ip()) {
        IpAddr::V4(v4) => vec![ipv4_mapped(v4.octets())],
        IpAddr::V6(v6) if v6.is_unspecified() => vec![WILDCARD_V6, WILDCARD_V4],
        IpAddr::V6(v6) => vec![v6.octets()],
    };
    addrs
        .into_iter()
        .map(|a| ListenerKey::new(a, port, PROTO_TCP))
        .collect()
}

/// The `KF_PORTS` entries listeners need: per TCP port, its wildcard
/// listeners, or `PORT_SPECIFIC` when some listener binds an address there.
#[must_use]
pub fn ports_of(listeners: &BTreeMap<ListenerKey, ListenerValue>) -> BTreeMap<u16, u32> {
    let mut by_port: BTreeMap<u16, (Option<ListenerValue>, Option<ListenerValue>, bool)> =
        BTreeMap::new();
    for (key, value) in listeners.iter().filter(|(k, _)| k.proto == PROTO_TCP) {
        let entry = by_port.entry(u16::from_be_bytes(key.port)).or_default();
        match key.addr {
            WILDCARD_V4 => entry.0 = Some(*value),
            WILDCARD_V6 => entry.1 = Some(*value),
            _ => entry.2 = true,
        }
    }
    by_port
        .into_iter()
        .map(|(port, (v4, v6, specific))| (port, port_value(v4, v6, specific)))
        .collect()
}

/// One datapath entry of a policy: `/32` and `/128` go to the exact hash,
/// everything else to the trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Exact(PolicyAddr),
    Prefix(PrefixKey),
}

/// The entry of `net` under `policy`. One-to-one on canonical (folded)
/// networks, so two networks never share an entry.
fn entry(policy: u32, net: Net) -> Entry {
    match *net {
        IpNet::V4(v4) if v4.prefix_len() == 32 => {
            Entry::Exact(PolicyAddr::new(policy, ipv4_mapped(v4.addr().octets())))
        }
        IpNet::V6(v6) if v6.prefix_len() == 128 => {
            Entry::Exact(PolicyAddr::new(policy, v6.addr().octets()))
        }
        IpNet::V4(v4) => Entry::Prefix((
            POLICY_BITS + V4_MAPPED_BITS + u32::from(v4.prefix_len()),
            PolicyAddr::new(policy, ipv4_mapped(v4.network().octets())),
        )),
        IpNet::V6(v6) => Entry::Prefix((
            POLICY_BITS + u32::from(v6.prefix_len()),
            PolicyAddr::new(policy, v6.network().octets()),
        )),
    }
}

/// The trie key of `::ffff:0:0/96`, which is also the entry of `0.0.0.0/0`.
fn v4_space(policy: u32) -> Entry {
    Entry::Prefix((
        POLICY_BITS + V4_MAPPED_BITS,
        PolicyAddr::new(policy, ipv4_mapped([0; 4])),
    ))
}

fn is_v4_any(net: &Net) -> bool {
    matches!(**net, IpNet::V4(v4) if v4.prefix_len() == 0)
}

/// What the `v4_space` entry of a policy holds. An IPv6 prefix never admits an
/// IPv4 client (SPEC §3), while in the trie IPv4 lives inside `::ffff:0:0/96`:
/// an IPv6 prefix covering that space gets a `DENIED` marker there, unless
/// `0.0.0.0/0` is itself allowed (same key, value `ALLOWED`).
/// `holds` tells whether a network is in the policy.
fn v4_space_value(holds: impl Fn(&Net) -> bool) -> Option<u32> {
    if holds(&Net::derived(IpNet::V4(Ipv4Net::default()))) {
        return Some(ALLOWED);
    }
    // The IPv6 networks that cover `::ffff:0:0/96`; that one itself is
    // `0.0.0.0/0` in canonical form, asked above.
    let mapped = Ipv6Addr::from(ipv4_mapped([0; 4]));
    let covered = (0..96).any(|len| {
        holds(&Net::derived(IpNet::V6(
            Ipv6Net::new(mapped, len).expect("len ≤ 128").trunc(),
        )))
    });
    covered.then_some(DENIED)
}

fn in_slice(nets: &[Net]) -> impl Fn(&Net) -> bool + '_ {
    |n| nets.binary_search(n).is_ok()
}

/// A restricted listener's networks in order. The compiler gives them
/// sorted and distinct (and canonical, by type); a hand-built policy may
/// not be in order, and the writer's merges need it.
fn in_order(nets: &[Net]) -> Vec<Net> {
    let mut out = nets.to_vec();
    if !out.is_sorted_by(|a, b| a < b) {
        out.sort_unstable();
        out.dedup();
    }
    out
}

/// Every entry of a restricted policy.
fn entries_of(policy: u32, nets: &[Net]) -> BTreeMap<Entry, u32> {
    let mut out: BTreeMap<Entry, u32> = nets
        .iter()
        .filter(|n| !is_v4_any(n))
        .map(|&n| (entry(policy, n), ALLOWED))
        .collect();
    if let Some(value) = v4_space_value(in_slice(nets)) {
        out.insert(v4_space(policy), value);
    }
    out
}

/// What the maps hold for one policy slot.
#[derive(Clone, Debug)]
enum Held {
    /// Exactly the entries of these networks (canonical, sorted), as written
    /// by us. Packed (about 5 bytes a network instead of a `Net`'s 18): the
    /// writer's memory of a million prefixes is ≈ 5 MiB, and a one-network
    /// change re-encodes one chunk.
    Nets(PackedNets),
    /// Entries read back from the maps: adopted from a previous agent, or
    /// re-read after a failed write.
    Entries(BTreeMap<Entry, u32>),
}

/// One map write: an entry going from one value to another (`None` = absent).
#[derive(Clone, Copy, Debug)]
struct Op {
    entry: Entry,
    from: Option<u32>,
    to: Option<u32>,
}

impl Op {
    /// Widening writes go before listeners switch, narrowing ones after.
    fn widens(&self) -> bool {
        self.to == Some(ALLOWED) || (self.from.is_none() && self.to.is_some())
    }
}

/// The writes that take `slot` from what it holds to `nets` (canonical).
fn slot_ops(slot: u32, held: Option<&Held>, nets: &[Net], ops: &mut Vec<Op>) {
    match held {
        // Straight from the networks (one entry each, see `entry`): a
        // first apply of a million prefixes needs no ordered map of them.
        None => {
            ops.reserve(nets.len() + 1);
            ops.extend(nets.iter().filter(|n| !is_v4_any(n)).map(|&n| Op {
                entry: entry(slot, n),
                from: None,
                to: Some(ALLOWED),
            }));
            if let Some(v) = v4_space_value(in_slice(nets)) {
                ops.push(Op {
                    entry: v4_space(slot),
                    from: None,
                    to: Some(v),
                });
            }
        }
        Some(Held::Entries(have)) => {
            let want = entries_of(slot, nets);
            for (&entry, &v) in &want {
                if have.get(&entry) != Some(&v) {
                    ops.push(Op {
                        entry,
                        from: have.get(&entry).copied(),
                        to: Some(v),
                    });
                }
            }
            for (&entry, &v) in have {
                if !want.contains_key(&entry) {
                    ops.push(Op {
                        entry,
                        from: Some(v),
                        to: None,
                    });
                }
            }
        }
        Some(Held::Nets(old)) => {
            // Both are sorted: one merge pass finds what changed.
            let (mut have, mut want) = (old.iter().peekable(), nets.iter().copied().peekable());
            loop {
                let (net, from, to) = match (have.peek(), want.peek()) {
                    (None, None) => break,
                    (Some(a), Some(b)) if a == b => {
                        have.next();
                        want.next();
                        continue;
                    }
                    (Some(a), Some(b)) if a < b => (*a, Some(ALLOWED), None),
                    (Some(a), None) => (*a, Some(ALLOWED), None),
                    (_, Some(b)) => (*b, None, Some(ALLOWED)),
                };
                if from.is_some() {
                    have.next();
                } else {
                    want.next();
                }
                if !is_v4_any(&net) {
                    ops.push(Op {
                        entry: entry(slot, net),
                        from,
                        to,
                    });
                }
            }
            let from = v4_space_value(|n| old.contains(n));
            let to = v4_space_value(in_slice(nets));
            if from != to {
                ops.push(Op {
                    entry: v4_space(slot),
                    from,
                    to,
                });
            }
        }
    }
}

/// What the writer knows after an apply: which slot each listener name holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotMap {
    pub by_name: BTreeMap<String, u32>,
}

impl SlotMap {
    #[must_use]
    pub fn name(&self, slot: u32) -> Option<&str> {
        self.by_name
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(n, _)| n.as_str())
    }
}

/// Counts of one apply, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub removed: usize,
    pub updated: usize,
}

/// Moves the kernel maps from policy to policy.
///
/// It remembers each slot's networks rather than its entries: a change to a
/// 100k-prefix policy is one merge of two sorted lists and a write per entry
/// that differs, with no copy of the maps kept in memory.
pub struct PolicyWriter<B> {
    backend: B,
    listeners: BTreeMap<ListenerKey, ListenerValue>,
    /// What `KF_PORTS` holds (non-zero entries).
    ports: BTreeMap<u16, u32>,
    held: BTreeMap<u32, Held>,
    /// Entries in `KF_EXACT` and `KF_PREFIXES` (what `held` amounts to).
    entries: EntryCounts,
    slots: SlotMap,
    /// The sizes the maps were created with.
    capacity: MapCapacity,
    /// The direct IPv4 tables' writer, driven from [`Self::write`].
    direct: DirectWriter,
}

/// The writes of one full apply, computed without touching the maps.
struct Plan {
    ops: Vec<Op>,
    listeners: BTreeMap<ListenerKey, ListenerValue>,
    nets: BTreeMap<u32, Vec<Net>>,
    slots: SlotMap,
}

/// Entries per map, against the maps' capacities.
#[derive(Clone, Copy, Debug, Default)]
struct EntryCounts {
    exact: i64,
    prefixes: i64,
}

impl EntryCounts {
    fn count(&mut self, entry: &Entry, delta: i64) {
        match entry {
            Entry::Exact(_) => self.exact += delta,
            Entry::Prefix(_) => self.prefixes += delta,
        }
    }

    /// The counts while `ops` are written: every new entry is in place
    /// before any old one goes (see the module doc), so this is the most the
    /// maps hold at once.
    fn peak(mut self, ops: &[Op]) -> Self {
        for op in ops.iter().filter(|op| op.from.is_none() && op.to.is_some()) {
            self.count(&op.entry, 1);
        }
        self
    }

    fn after(mut self, ops: &[Op]) -> Self {
        for op in ops {
            self.count(
                &op.entry,
                i64::from(op.to.is_some()) - i64::from(op.from.is_some()),
            );
        }
        self
    }
}

impl<B: PolicyBackend> PolicyWriter<B> {
    /// Adopt whatever the maps hold now (empty on a first start, the previous
    /// agent's policy after a restart) as the starting point of the next diff.
    pub fn adopt(backend: B) -> anyhow::Result<Self> {
        let mut writer = Self {
            backend,
            listeners: BTreeMap::new(),
            ports: BTreeMap::new(),
            held: BTreeMap::new(),
            entries: EntryCounts::default(),
            slots: SlotMap::default(),
            capacity: MapCapacity::default(),
            direct: DirectWriter::default(),
        };
        writer
            .read_back()
            .context("reading the pinned policy maps")?;
        Ok(writer)
    }

    /// Forget what we wrote and take the maps' contents as they are.
    fn read_back(&mut self) -> anyhow::Result<()> {
        let tables = self.backend.read_all()?;
        self.entries = EntryCounts {
            exact: i64::try_from(tables.exact.len()).unwrap_or(i64::MAX),
            prefixes: i64::try_from(tables.prefixes.len()).unwrap_or(i64::MAX),
        };
        let mut held: BTreeMap<u32, BTreeMap<Entry, u32>> = BTreeMap::new();
        for key in tables.exact {
            held.entry(key.policy())
                .or_default()
                .insert(Entry::Exact(key), ALLOWED);
        }
        for (key, value) in tables.prefixes {
            held.entry(key.1.policy())
                .or_default()
                .insert(Entry::Prefix(key), value);
        }
        self.listeners = tables.listeners;
        self.ports = tables.ports;
        self.held = held
            .into_iter()
            .map(|(slot, entries)| (slot, Held::Entries(entries)))
            .collect();
        Ok(())
    }

    /// The sizes the maps hold (the defaults unless set here): what every
    /// apply is checked against before it writes.
    #[must_use]
    pub fn with_capacity(mut self, capacity: MapCapacity) -> Self {
        self.capacity = capacity;
        self
    }

    #[must_use]
    pub fn slots(&self) -> &SlotMap {
        &self.slots
    }

    /// What the maps hold, rebuilt from what was written (for tests and the
    /// reference model; a copy, so not for hot paths).
    #[must_use]
    pub fn tables(&self) -> PolicyTables {
        let mut tables = PolicyTables {
            listeners: self.listeners.clone(),
            ports: self.ports.clone(),
            // Not derived from what was written: the ids are the writer's choice.
            direct: self.backend.read_direct().unwrap_or_default(),
            ..PolicyTables::default()
        };
        for (&slot, held) in &self.held {
            let entries = match held {
                Held::Nets(nets) => entries_of(slot, &nets.to_vec()),
                Held::Entries(entries) => entries.clone(),
            };
            for (entry, value) in entries {
                match entry {
                    Entry::Exact(key) => {
                        tables.exact.insert(key);
                    }
                    Entry::Prefix(key) => {
                        tables.prefixes.insert(key, value);
                    }
                }
            }
        }
        tables
    }

    #[must_use]
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Slot for each listener: keep the slot its bind already has in the maps,
    /// otherwise take a slot that nothing uses.
    fn assign_slots(&self, policy: &CompiledPolicy) -> anyhow::Result<Vec<u32>> {
        let in_use: BTreeSet<u32> = self
            .listeners
            .values()
            .map(|v| v.policy)
            .chain(self.held.keys().copied())
            .collect();
        let mut taken = BTreeSet::new();
        let mut slots = Vec::with_capacity(policy.listeners.len());
        let mut pending = Vec::new();
        for (i, listener) in policy.listeners.iter().enumerate() {
            let existing = listener_keys(listener.bind)
                .iter()
                .find_map(|k| self.listeners.get(k))
                .map(|v| v.policy)
                .filter(|s| *s > 0 && *s < MAX_LISTENERS && !taken.contains(s));
            if let Some(slot) = existing {
                taken.insert(slot);
                slots.push(slot);
            } else {
                slots.push(0);
                pending.push(i);
            }
        }
        // Prefer slots nothing references (no transient mixing of two policies);
        // fall back to slots that only departing listeners use.
        let mut free = (1..MAX_LISTENERS)
            .filter(|s| !in_use.contains(s) && !taken.contains(s))
            .chain((1..MAX_LISTENERS).filter(|s| in_use.contains(s) && !taken.contains(s)));
        for i in pending {
            let Some(slot) = free.next() else {
                return Err(CapacityError::Listeners {
                    limit: MAX_LISTENERS - 1,
                }
                .into());
            };
            slots[i] = slot;
        }
        Ok(slots)
    }

    /// The writes that take the maps to `policy`, nothing written.
    fn plan(&self, policy: &CompiledPolicy) -> anyhow::Result<Plan> {
        let slots = self.assign_slots(policy)?;
        let mut want_listeners = BTreeMap::new();
        let mut want_nets: BTreeMap<u32, Vec<Net>> = BTreeMap::new();
        let mut slot_map = SlotMap::default();
        for (listener, &slot) in policy.listeners.iter().zip(&slots) {
            let flags = match &listener.access {
                Access::Open => LISTENER_OPEN,
                Access::Restricted(nets) => {
                    want_nets.insert(slot, in_order(nets));
                    0
                }
            };
            for key in listener_keys(listener.bind) {
                want_listeners.insert(
                    key,
                    ListenerValue {
                        policy: slot,
                        flags,
                    },
                );
            }
            slot_map.by_name.insert(listener.name.clone(), slot);
        }
        let mut ops = Vec::new();
        for (&slot, nets) in &want_nets {
            slot_ops(slot, self.held.get(&slot), nets, &mut ops);
        }
        for (&slot, held) in &self.held {
            if !want_nets.contains_key(&slot) {
                slot_ops(slot, Some(held), &[], &mut ops);
            }
        }
        Ok(Plan {
            ops,
            listeners: want_listeners,
            nets: want_nets,
            slots: slot_map,
        })
    }

    /// Whether [`Self::apply`] of `policy` would fit, without writing: the
    /// management API asks this before it commits a change.
    pub fn check_apply(&self, policy: &CompiledPolicy) -> anyhow::Result<()> {
        let plan = self.plan(policy)?;
        self.check_capacity(&plan.ops)?;
        Ok(())
    }

    /// Make the maps enforce `policy`. On error the maps hold a safe
    /// intermediate state (never narrower than before ∩ after); the writer
    /// reads it back, so the next apply continues from there. A
    /// [`CapacityError`] is returned before anything is written.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> anyhow::Result<ApplyReport> {
        let mut phases = crate::phases::Phases::start();
        let plan = self.plan(policy)?;
        let entries = self.check_capacity(&plan.ops)?;
        phases.done("map writes planned");
        let v4 = V4Want::To(
            Pieces::of(
                plan.nets
                    .iter()
                    .map(|(slot, nets)| (*slot, nets.iter().copied())),
            ),
            None,
        );
        phases.done("direct tables planned");
        let written = self.write(&plan.ops, Some(&plan.listeners), &v4);
        phases.done("map writes");
        match written {
            Ok(report) => {
                self.entries = entries;
                self.held = plan
                    .nets
                    .into_iter()
                    .map(|(slot, nets)| (slot, Held::Nets(PackedNets::from_sorted(&nets))))
                    .collect();
                self.slots = plan.slots;
                Ok(report)
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Apply changes to restricted listeners' prefixes (listeners, binds and
    /// open/restricted unchanged since the last apply): writes only the
    /// entries the changes touch, with no pass over the rest. `Ok(None)`
    /// when the writer cannot take them this way (a listener it did not
    /// write, or a change that does not match what it holds); use
    /// [`Self::apply`] then.
    pub fn apply_changes(
        &mut self,
        changes: &[(String, Change)],
    ) -> anyhow::Result<Option<ApplyReport>> {
        let Some((ops, slots)) = self.plan_changes(changes) else {
            return Ok(None);
        };
        let entries = self.check_capacity(&ops)?;
        let v4 = self.v4_after(changes, &slots);
        match self.write(&ops, None, &v4) {
            Ok(report) => {
                self.entries = entries;
                for ((_, change), slot) in changes.iter().zip(slots) {
                    if let Some(Held::Nets(have)) = self.held.get_mut(&slot) {
                        for n in &change.removed {
                            have.remove(n);
                        }
                        for &n in &change.added {
                            have.insert(n);
                        }
                    }
                }
                Ok(Some(report))
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Whether [`Self::apply_changes`] would fit, without writing; `Ok(None)`
    /// when it would not take them (ask [`Self::check_apply`] then).
    pub fn check_changes(&self, changes: &[(String, Change)]) -> Result<Option<()>, CapacityError> {
        let Some((ops, _)) = self.plan_changes(changes) else {
            return Ok(None);
        };
        self.check_capacity(&ops).map(|_| Some(()))
    }

    /// The writes of [`Self::apply_changes`] and the slots they touch.
    fn plan_changes(&self, changes: &[(String, Change)]) -> Option<(Vec<Op>, Vec<u32>)> {
        let mut ops = Vec::new();
        let mut slots = Vec::with_capacity(changes.len());
        for (name, change) in changes {
            let &slot = self.slots.by_name.get(name)?;
            let Some(Held::Nets(have)) = self.held.get(&slot) else {
                return None;
            };
            let held = |n: &Net| have.contains(n);
            if !change.removed.iter().all(held) || change.added.iter().any(held) {
                return None;
            }
            for (net, from, to) in change
                .removed
                .iter()
                .map(|n| (n, Some(ALLOWED), None))
                .chain(change.added.iter().map(|n| (n, None, Some(ALLOWED))))
            {
                if !is_v4_any(net) {
                    ops.push(Op {
                        entry: entry(slot, *net),
                        from,
                        to,
                    });
                }
            }
            let from = v4_space_value(held);
            let to = v4_space_value(|n| {
                change.added.contains(n) || (held(n) && !change.removed.contains(n))
            });
            if from != to {
                ops.push(Op {
                    entry: v4_space(slot),
                    from,
                    to,
                });
            }
            slots.push(slot);
        }
        Some((ops, slots))
    }

    /// Forget what the writer believes and read the maps again, so that the
    /// next apply diffs against what the kernel holds (a reconcile: the maps
    /// may have changed under it, space may have come back).
    pub fn resync(&mut self) -> anyhow::Result<()> {
        self.read_back().context("re-reading the policy maps")
    }

    /// After a failed write: take the maps as they are now.
    fn failed(&mut self, e: anyhow::Error) -> anyhow::Error {
        match self.read_back() {
            Ok(()) => e,
            Err(read) => e.context(format!("and reading the maps back failed: {read:#}")),
        }
    }

    /// Refuse, before writing anything, a policy the maps cannot hold, at
    /// any moment of its writes (new entries go in before old ones leave).
    /// Returns the counts once written.
    fn check_capacity(&self, ops: &[Op]) -> Result<EntryCounts, CapacityError> {
        let peak = self.entries.peak(ops);
        if peak.exact > i64::from(self.capacity.exact) {
            return Err(CapacityError::Exact {
                needed: peak.exact,
                limit: self.capacity.exact,
            });
        }
        if peak.prefixes > i64::from(self.capacity.prefixes) {
            return Err(CapacityError::Prefixes {
                needed: peak.prefixes,
                limit: self.capacity.prefixes,
            });
        }
        Ok(self.entries.after(ops))
    }

    /// After a failed write: mark open every listener of `policy` whose
    /// entries in the maps do not cover its allow set, so that the datapath
    /// passes every source the shim accepts until a full apply succeeds (it
    /// closes them again once their entries are in place). Only listener
    /// and port entries are written: those never need map space (updating
    /// an existing hash entry does not count against `max_entries`, and the
    /// port table is an array). Returns the names of the listeners opened.
    pub fn open_uncovered(&mut self, policy: &CompiledPolicy) -> anyhow::Result<Vec<String>> {
        let mut listeners = self.listeners.clone();
        let mut opened = Vec::new();
        for l in &policy.listeners {
            let nets = match &l.access {
                Access::Open => Vec::new(),
                Access::Restricted(nets) => in_order(nets),
            };
            let mut open_here = false;
            for key in listener_keys(l.bind) {
                // Where the kernel sends this listener's packets: its own
                // entry, else (a specific bind not written yet) the port's
                // wildcard of the same family; neither means they pass.
                let v4 = key.addr == WILDCARD_V4
                    || (key.addr != WILDCARD_V6 && key.addr[..12] == ipv4_mapped([0; 4])[..12]);
                let wildcard = ListenerKey {
                    addr: if v4 { WILDCARD_V4 } else { WILDCARD_V6 },
                    ..key
                };
                let target = if listeners.contains_key(&key) {
                    key
                } else {
                    wildcard
                };
                let Some(value) = listeners.get_mut(&target) else {
                    continue;
                };
                let covered = value.flags & LISTENER_OPEN != 0
                    || (matches!(l.access, Access::Restricted(_))
                        && self.slot_covers(value.policy, &nets));
                if !covered {
                    value.flags |= LISTENER_OPEN;
                    open_here = true;
                }
            }
            if open_here {
                opened.push(l.name.clone());
            }
        }
        // Entries of listeners `policy` no longer has may still catch
        // packets that now belong to one it has (a specific bind that became
        // a wildcard): open them too until the full apply removes them.
        let wanted: BTreeSet<ListenerKey> = policy
            .listeners
            .iter()
            .flat_map(|l| listener_keys(l.bind))
            .collect();
        for (key, value) in &mut listeners {
            if !wanted.contains(key) {
                value.flags |= LISTENER_OPEN;
            }
        }
        // Written even when nothing opens: a write that failed between the
        // listener map and the port table left them disagreeing.
        let mut report = ApplyReport::default();
        if let Err(e) = self.write_listeners(&listeners, &mut report) {
            return Err(self.failed(e));
        }
        Ok(opened)
    }

    /// Whether the maps hold every allow entry of `nets` under `slot`.
    fn slot_covers(&self, slot: u32, nets: &[Net]) -> bool {
        let want = entries_of(slot, nets);
        let have = match self.held.get(&slot) {
            None => BTreeMap::new(),
            Some(Held::Nets(held)) => entries_of(slot, &held.to_vec()),
            Some(Held::Entries(entries)) => entries.clone(),
        };
        want.iter()
            .filter(|(_, v)| **v == ALLOWED)
            .all(|(entry, _)| have.get(entry) == Some(&ALLOWED))
    }

    /// The writes, in the order that keeps every flow allowed before and after
    /// allowed throughout (see the module doc). `listeners`: the listener map
    /// to reach between widening and narrowing; `None` leaves it as it is.
    fn write(
        &mut self,
        ops: &[Op],
        listeners: Option<&BTreeMap<ListenerKey, ListenerValue>>,
        v4: &V4Want,
    ) -> anyhow::Result<ApplyReport> {
        let result = self.write_ordered(ops, listeners, v4);
        if result.is_err()
            && let Some(direct) = self.backend.direct()
        {
            self.direct.abort(direct);
        }
        result
    }

    fn write_ordered(
        &mut self,
        ops: &[Op],
        listeners: Option<&BTreeMap<ListenerKey, ListenerValue>>,
        v4: &V4Want,
    ) -> anyhow::Result<ApplyReport> {
        let mut report = ApplyReport::default();
        // 1. New allows first, the direct tables' widening pass after the
        // trie's (a fall-back to the trie may come at any point of it).
        let mut phases = crate::phases::Phases::start();
        self.write_ops(ops.iter().filter(|op| op.widens()), &mut report)?;
        phases.done("widening trie and hash writes");
        self.direct_step(v4, true)?;
        phases.done("widening direct writes");
        if let Some(listeners) = listeners {
            self.write_listeners(listeners, &mut report)?;
        }
        // 4. Narrowing last; the direct tables' after the trie's, so that a
        // switch to direct mode finds both exact.
        self.write_ops(ops.iter().filter(|op| !op.widens()), &mut report)?;
        self.direct_step(v4, false)?;
        Ok(report)
    }

    /// One pass of the direct tables' sync (`maps::direct`).
    fn direct_step(&mut self, v4: &V4Want, widen: bool) -> anyhow::Result<()> {
        let Some(direct) = self.backend.direct() else {
            return Ok(());
        };
        match v4 {
            V4Want::To(want, touched) if widen => {
                self.direct.widen(direct, want, touched.as_deref())
            }
            V4Want::To(want, _) => self.direct.narrow(direct, want),
            V4Want::Unknown if widen => self
                .direct
                .give_up(direct, "networks read back, not written"),
            V4Want::Skip | V4Want::Unknown => Ok(()),
        }
    }

    /// Which structure decides IPv4 sources after the last apply.
    #[must_use]
    pub fn v4_path(&self) -> V4Path {
        self.direct.path()
    }

    /// The direct tables' target after `changes` to `slots`:
    /// [`V4Want::Skip`] when none touches IPv4 and the tables are in use.
    fn v4_after(&self, changes: &[(String, Change)], slots: &[u32]) -> V4Want {
        let is_v4 = |n: &Net| matches!(**n, IpNet::V4(_));
        let touches_v4 = changes
            .iter()
            .any(|(_, c)| c.added.iter().chain(&c.removed).any(is_v4));
        if !touches_v4 && self.direct.path() == V4Path::Direct {
            return V4Want::Skip;
        }
        // The changed slots' IPv4 networks after the changes; the others are
        // read from what the writer holds, not copied (IPv4 sorts before
        // IPv6, so a packed set is read only as far as its IPv4 part).
        let mut after: BTreeMap<u32, Vec<Net>> = BTreeMap::new();
        for ((_, change), &slot) in changes.iter().zip(slots) {
            let Some(Held::Nets(have)) = self.held.get(&slot) else {
                return V4Want::Unknown;
            };
            let nets = after
                .entry(slot)
                .or_insert_with(|| have.iter().take_while(is_v4).collect());
            nets.retain(|n| !change.removed.contains(n));
            nets.extend(change.added.iter().copied().filter(is_v4));
        }
        let mut slices: Vec<(u32, Box<dyn Iterator<Item = Net> + '_>)> = Vec::new();
        for (&slot, held) in &self.held {
            match (after.get(&slot), held) {
                (Some(nets), _) => slices.push((slot, Box::new(nets.iter().copied()))),
                (None, Held::Nets(have)) => {
                    slices.push((slot, Box::new(have.iter().take_while(is_v4))));
                }
                (None, Held::Entries(_)) => return V4Want::Unknown,
            }
        }
        V4Want::To(Pieces::of(slices), touched_tops(changes))
    }

    /// Steps 2 and 3: the listener map and the port table it implies.
    fn write_listeners(
        &mut self,
        want_listeners: &BTreeMap<ListenerKey, ListenerValue>,
        report: &mut ApplyReport,
    ) -> anyhow::Result<()> {
        // 2. Listeners now point at complete entries. Specific addresses go
        // first: a new `192.0.2.9:P` must take its packets over before the
        // wildcard `[::]:P` they fell to so far changes under them.
        let is_wildcard = |k: &ListenerKey| k.addr == WILDCARD_V4 || k.addr == WILDCARD_V6;
        let specific_first = want_listeners
            .iter()
            .filter(|(k, _)| !is_wildcard(k))
            .chain(want_listeners.iter().filter(|(k, _)| is_wildcard(k)));
        for (key, value) in specific_first {
            if self.listeners.get(key) != Some(value) {
                self.backend.put_listener(key, value)?;
                self.listeners.insert(*key, *value);
                report.updated += 1;
            }
        }
        // The port table follows: a port whose only listeners were wildcards
        // and now has a specific one switches to the full lookup once the new
        // listener entries exist, and back before any of them go.
        let want_ports = ports_of(want_listeners);
        for (&port, &value) in &want_ports {
            if self.ports.get(&port) != Some(&value) {
                self.backend.put_port(port, value)?;
                self.ports.insert(port, value);
                report.updated += 1;
            }
        }
        let stale: Vec<u16> = self
            .ports
            .keys()
            .filter(|p| !want_ports.contains_key(p))
            .copied()
            .collect();
        for port in stale {
            self.backend.put_port(port, 0)?;
            self.ports.remove(&port);
            report.removed += 1;
        }
        // 3. Listeners that are gone.
        let gone: Vec<ListenerKey> = self
            .listeners
            .keys()
            .filter(|k| !want_listeners.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.backend.del_listener(&key)?;
            self.listeners.remove(&key);
            report.removed += 1;
        }
        Ok(())
    }

    /// `ops` in their order; each run of one kind (exact puts, exact
    /// removals, prefix puts, prefix removals) goes to the backend as one
    /// batch of at most [`BATCH`].
    fn write_ops<'o>(
        &mut self,
        ops: impl Iterator<Item = &'o Op>,
        report: &mut ApplyReport,
    ) -> anyhow::Result<()> {
        let mut run = Run::default();
        for op in ops {
            let kind = RunKind::of(op);
            if run.kind != Some(kind) || run.len() == BATCH {
                run.flush(&mut self.backend)?;
                run.kind = Some(kind);
            }
            run.push(op);
            match (op.from, op.to) {
                (None, _) => report.added += 1,
                (_, None) => report.removed += 1,
                _ => report.updated += 1,
            }
        }
        run.flush(&mut self.backend)
    }
}

/// Entries handed to the backend in one call: enough that the per-call cost
/// vanishes, few enough that the buffers stay small (≈ 200 KiB).
const BATCH: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunKind {
    PutExact,
    DelExact,
    PutPrefix,
    DelPrefix,
}

impl RunKind {
    fn of(op: &Op) -> Self {
        match (op.entry, op.to) {
            (Entry::Exact(_), Some(_)) => Self::PutExact,
            (Entry::Exact(_), None) => Self::DelExact,
            (Entry::Prefix(_), Some(_)) => Self::PutPrefix,
            (Entry::Prefix(_), None) => Self::DelPrefix,
        }
    }
}

/// Consecutive writes of one kind, waiting to go out together.
#[derive(Default)]
struct Run {
    kind: Option<RunKind>,
    exact: Vec<PolicyAddr>,
    prefixes: Vec<PrefixKey>,
    values: Vec<u32>,
}

impl Run {
    fn len(&self) -> usize {
        self.exact.len() + self.prefixes.len()
    }

    fn push(&mut self, op: &Op) {
        match op.entry {
            Entry::Exact(key) => self.exact.push(key),
            Entry::Prefix(key) => {
                self.prefixes.push(key);
                if let Some(value) = op.to {
                    self.values.push(value);
                }
            }
        }
    }

    fn flush(&mut self, backend: &mut impl PolicyBackend) -> anyhow::Result<()> {
        match self.kind {
            None => {}
            Some(RunKind::PutExact) => backend.put_exact_many(&self.exact)?,
            Some(RunKind::DelExact) => backend.del_exact_many(&self.exact)?,
            Some(RunKind::PutPrefix) => backend.put_prefix_many(&self.prefixes, &self.values)?,
            Some(RunKind::DelPrefix) => backend.del_prefix_many(&self.prefixes)?,
        }
        self.exact.clear();
        self.prefixes.clear();
        self.values.clear();
        Ok(())
    }
}

/// The top entries of the direct tables (one per /16) that `changes` reach,
/// sorted; `None` past [`TOUCHED_TOPS_MAX`] (a sync then visits them all).
fn touched_tops(changes: &[(String, Change)]) -> Option<Vec<u32>> {
    let mut tops = Vec::new();
    for (_, change) in changes {
        for net in change.added.iter().chain(&change.removed) {
            if let IpNet::V4(v4) = **net {
                let (first, last) = (
                    u32::from(v4.network()) >> 16,
                    u32::from(v4.broadcast()) >> 16,
                );
                if (last - first) as usize >= TOUCHED_TOPS_MAX || tops.len() >= TOUCHED_TOPS_MAX {
                    return None;
                }
                tops.extend(first..=last);
            }
        }
    }
    tops.sort_unstable();
    tops.dedup();
    (tops.len() <= TOUCHED_TOPS_MAX).then_some(tops)
}

/// Past this many /16s a change's sync visits the whole table.
const TOUCHED_TOPS_MAX: usize = 4096;

/// What the direct IPv4 tables should reach in one write.
enum V4Want {
    /// Nothing IPv4 changes.
    Skip,
    /// These allow sets, reached by a sync of the top entries listed (of
    /// every one: `None`).
    To(Pieces, Option<Vec<u32>>),
    /// The writer does not know every slot's networks (entries adopted from
    /// the maps): IPv4 takes the trie until a full apply.
    Unknown,
}

/// The policy maps in the kernel.
pub struct KernelPolicyMaps {
    listeners: HashMap<MapData, ListenerKey, ListenerValue>,
    ports: Array<MapData, u32>,
    exact: HashMap<MapData, PolicyAddr, u32>,
    prefixes: LpmTrie<MapData, PolicyAddr, u32>,
    direct: KernelDirectMaps,
}

/// How full the policy maps are, by listener slot (`keyfence status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFill {
    pub listeners: BTreeMap<ListenerKey, ListenerValue>,
    /// Listener slot → `KF_EXACT` entries.
    pub exact: BTreeMap<u32, usize>,
    /// Listener slot → `KF_PREFIXES` entries.
    pub prefixes: BTreeMap<u32, usize>,
    /// `KF_V4_MODE`: what decides IPv4 sources.
    pub v4_mode: u32,
}

impl KernelPolicyMaps {
    pub fn open(maps: &mut MapSource<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            listeners: maps.map(map_names::LISTENERS)?,
            ports: maps.map(map_names::PORTS)?,
            exact: maps.map(map_names::EXACT)?,
            prefixes: maps.map(map_names::PREFIXES)?,
            direct: KernelDirectMaps::open(maps)?,
        })
    }

    /// The listeners and each slot's entry counts, without reading `KF_PORTS`.
    pub fn fill(&self) -> anyhow::Result<PolicyFill> {
        let mut fill = PolicyFill {
            v4_mode: self.direct.mode()?,
            ..PolicyFill::default()
        };
        for item in &self.listeners {
            let (k, v) = item.context("iterating KF_LISTENERS")?;
            fill.listeners.insert(k, v);
        }
        for key in self.exact.keys() {
            *fill
                .exact
                .entry(key.context("iterating KF_EXACT")?.policy())
                .or_default() += 1;
        }
        for key in self.prefixes.keys() {
            *fill
                .prefixes
                .entry(key.context("iterating KF_PREFIXES")?.data().policy())
                .or_default() += 1;
        }
        Ok(fill)
    }
}

impl PolicyBackend for KernelPolicyMaps {
    fn put_listener(&mut self, key: &ListenerKey, value: &ListenerValue) -> anyhow::Result<()> {
        self.listeners
            .insert(key, value, 0)
            .context("writing KF_LISTENERS")
    }
    fn del_listener(&mut self, key: &ListenerKey) -> anyhow::Result<()> {
        self.listeners
            .remove(key)
            .context("removing from KF_LISTENERS")
    }
    fn put_port(&mut self, port: u16, value: u32) -> anyhow::Result<()> {
        self.ports
            .set(u32::from(port), value, 0)
            .context("writing KF_PORTS")
    }
    fn put_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()> {
        self.exact
            .insert(key, ALLOWED, 0)
            .context("writing KF_EXACT")
    }
    fn del_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()> {
        self.exact.remove(key).context("removing from KF_EXACT")
    }
    fn put_prefix(&mut self, key: &PrefixKey, value: u32) -> anyhow::Result<()> {
        self.prefixes
            .insert(&Key::new(key.0, key.1), value, 0)
            .context("writing KF_PREFIXES")
    }
    fn del_prefix(&mut self, key: &PrefixKey) -> anyhow::Result<()> {
        self.prefixes
            .remove(&Key::new(key.0, key.1))
            .context("removing from KF_PREFIXES")
    }
    fn put_exact_many(&mut self, keys: &[PolicyAddr]) -> anyhow::Result<()> {
        let values = vec![ALLOWED; keys.len()];
        let done = batched(self.exact.map(), MapBatch::Update, keys, &values);
        keys[done..].iter().try_for_each(|k| self.put_exact(k))
    }
    fn del_exact_many(&mut self, keys: &[PolicyAddr]) -> anyhow::Result<()> {
        let done = batched::<_, u32>(self.exact.map(), MapBatch::Delete, keys, &[]);
        keys[done..].iter().try_for_each(|k| self.del_exact(k))
    }
    fn put_prefix_many(&mut self, keys: &[PrefixKey], values: &[u32]) -> anyhow::Result<()> {
        let trie_keys: Vec<Key<PolicyAddr>> = keys.iter().map(|k| Key::new(k.0, k.1)).collect();
        let done = batched(self.prefixes.map(), MapBatch::Update, &trie_keys, values);
        keys[done..]
            .iter()
            .zip(&values[done..])
            .try_for_each(|(k, &v)| self.put_prefix(k, v))
    }
    fn del_prefix_many(&mut self, keys: &[PrefixKey]) -> anyhow::Result<()> {
        let trie_keys: Vec<Key<PolicyAddr>> = keys.iter().map(|k| Key::new(k.0, k.1)).collect();
        let done = batched::<_, u32>(self.prefixes.map(), MapBatch::Delete, &trie_keys, &[]);
        keys[done..].iter().try_for_each(|k| self.del_prefix(k))
    }
    fn read_all(&self) -> anyhow::Result<PolicyTables> {
        let mut tables = PolicyTables::default();
        for item in &self.listeners {
            let (k, v) = item.context("iterating KF_LISTENERS")?;
            tables.listeners.insert(k, v);
        }
        for port in 0..=u16::MAX {
            let value = self
                .ports
                .get(&u32::from(port), 0)
                .context("reading KF_PORTS")?;
            if value != 0 {
                tables.ports.insert(port, value);
            }
        }
        for key in self.exact.keys() {
            tables.exact.insert(key.context("iterating KF_EXACT")?);
        }
        for item in &self.prefixes {
            let (k, v) = item.context("iterating KF_PREFIXES")?;
            tables.prefixes.insert((k.prefix_len(), k.data()), v);
        }
        Ok(tables)
    }
    fn direct(&mut self) -> Option<&mut dyn DirectBackend> {
        Some(&mut self.direct)
    }
    fn read_direct(&self) -> anyhow::Result<DirectTables> {
        self.direct.read()
    }
}

/// One batch call for `keys`; how many the kernel took. The caller writes
/// the rest one by one: on a kernel without batch commands for the map (hash
/// maps have them since 5.6, the trie since 5.13) that is all of them, and
/// where an element failed its single write says why.
fn batched<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    op: MapBatch,
    keys: &[K],
    values: &[V],
) -> usize {
    use std::os::fd::AsFd as _;
    match crate::sys::map_batch(map.fd().as_fd(), op, keys, values) {
        Ok(()) => keys.len(),
        Err((taken, error)) => {
            tracing::debug!(%error, taken, of = keys.len(), ?op, "batch map write stopped; writing the rest one by one");
            taken
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::{Cell, RefCell},
        rc::Rc,
    };

    use anyhow::bail;
    use proptest::prelude::*;

    use keyfence_common::policy::PORT_SPECIFIC;

    use super::*;
    use crate::{maps::memory::MemoryBackend, policy::ListenerPolicy};

    fn restricted(name: &str, bind: &str, nets: &[&str]) -> ListenerPolicy {
        ListenerPolicy {
            name: name.into(),
            bind: bind.parse().unwrap(),
            access: Access::Restricted(nets.iter().map(|n| n.parse().unwrap()).collect()),
        }
    }

    fn open(name: &str, bind: &str) -> ListenerPolicy {
        ListenerPolicy {
            name: name.into(),
            bind: bind.parse().unwrap(),
            access: Access::Open,
        }
    }

    fn policy(listeners: Vec<ListenerPolicy>) -> CompiledPolicy {
        CompiledPolicy {
            listeners,
            next_change: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn dst(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn exact_and_prefix_entries_and_dual_stack_keys() {
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        w.apply(&policy(vec![restricted(
            "api",
            "[::]:8443",
            &[
                "192.0.2.10/32",
                "198.51.100.0/24",
                "2001:db8::1/128",
                "2001:db8:1::/48",
            ],
        )]))
        .unwrap();
        let t = &w.backend().tables;
        assert_eq!(t.listeners.len(), 2, "dual-stack bind: v4 and v6 wildcard");
        assert_eq!(t.exact.len(), 2);
        assert_eq!(t.prefixes.len(), 2);
        let d = dst("[2001:db8::ff]:8443");
        let d4 = dst("192.0.2.1:8443");
        assert_eq!(t.verdict(ip("192.0.2.10"), d4), Some(true));
        assert_eq!(t.verdict(ip("192.0.2.11"), d4), Some(false));
        assert_eq!(t.verdict(ip("198.51.100.200"), d4), Some(true));
        assert_eq!(t.verdict(ip("2001:db8::1"), d), Some(true));
        assert_eq!(t.verdict(ip("2001:db8:1:ffff::9"), d), Some(true));
        assert_eq!(t.verdict(ip("2001:db8:2::1"), d), Some(false));
        assert_eq!(t.verdict(ip("192.0.2.10"), dst("192.0.2.1:8444")), None);
        assert_eq!(w.slots().by_name["api"], 1);
    }

    #[test]
    fn ipv6_any_does_not_admit_ipv4() {
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        w.apply(&policy(vec![restricted("api", "[::]:1", &["::/0"])]))
            .unwrap();
        let t = &w.backend().tables;
        assert_eq!(
            t.verdict(ip("2001:db8::9"), dst("[2001:db8::1]:1")),
            Some(true)
        );
        assert_eq!(
            t.verdict(ip("203.0.113.9"), dst("192.0.2.1:1")),
            Some(false)
        );
        // Adding 0.0.0.0/0 turns the deny marker into an allow.
        w.apply(&policy(vec![restricted(
            "api",
            "[::]:1",
            &["::/0", "0.0.0.0/0"],
        )]))
        .unwrap();
        let t = &w.backend().tables;
        assert_eq!(t.verdict(ip("203.0.113.9"), dst("192.0.2.1:1")), Some(true));
        assert_eq!(t.prefixes.len(), 2);
    }

    #[test]
    fn open_listener_and_specific_bind() {
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        w.apply(&policy(vec![
            open("pub", "0.0.0.0:80"),
            restricted("adm", "192.0.2.1:22", &["203.0.113.0/24"]),
        ]))
        .unwrap();
        let t = &w.backend().tables;
        assert_eq!(
            t.verdict(ip("198.51.100.1"), dst("192.0.2.1:80")),
            Some(true)
        );
        assert_eq!(t.verdict(ip("198.51.100.1"), dst("[2001:db8::1]:80")), None);
        assert_eq!(
            t.verdict(ip("198.51.100.1"), dst("192.0.2.1:22")),
            Some(false)
        );
        assert_eq!(t.verdict(ip("198.51.100.1"), dst("192.0.2.2:22")), None);
    }

    #[test]
    fn slots_survive_adoption_and_reapply_is_a_no_op() {
        let p = policy(vec![
            restricted("a", "[::]:1", &["192.0.2.0/24"]),
            restricted("b", "[::]:2", &["198.51.100.7/32"]),
        ]);
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        w.apply(&p).unwrap();
        let before = w.slots().clone();
        // A restarted agent adopts the maps and finds nothing to do.
        let backend = MemoryBackend {
            tables: w.backend().tables.clone(),
            ops: 0,
        };
        let mut w2 = PolicyWriter::adopt(backend).unwrap();
        let report = w2.apply(&p).unwrap();
        assert_eq!(report, ApplyReport::default());
        assert_eq!(w2.backend().ops, 0);
        assert_eq!(w2.slots(), &before);
    }

    #[test]
    fn removed_listener_leaves_nothing_behind() {
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        w.apply(&policy(vec![
            restricted("a", "[::]:1", &["192.0.2.0/24", "192.0.2.200/32"]),
            restricted("b", "[::]:2", &["198.51.100.7/32"]),
        ]))
        .unwrap();
        w.apply(&policy(vec![restricted(
            "b",
            "[::]:2",
            &["198.51.100.7/32"],
        )]))
        .unwrap();
        let t = &w.backend().tables;
        assert_eq!(t.listeners.len(), 2);
        assert_eq!(t.exact.len(), 1);
        assert!(t.prefixes.is_empty());
        assert_eq!(w.slots().by_name["b"], 2, "b keeps its slot");
    }

    #[test]
    fn changes_the_writer_cannot_take_write_nothing() {
        let net = |s: &str| -> Net { s.parse().unwrap() };
        let change = |removed: &[&str], added: &[&str]| Change {
            removed: removed.iter().map(|s| net(s)).collect(),
            added: added.iter().map(|s| net(s)).collect(),
        };
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        w.apply(&policy(vec![
            restricted("api", "[::]:1", &["192.0.2.0/24"]),
            open("pub", "[::]:2"),
        ]))
        .unwrap();
        let before = w.backend().tables.clone();
        let ops = w.backend().ops;
        for (name, c, why) in [
            (
                "nope",
                change(&[], &["198.51.100.0/24"]),
                "unknown listener",
            ),
            ("pub", change(&[], &["198.51.100.0/24"]), "open listener"),
            (
                "api",
                change(&["198.51.100.0/24"], &[]),
                "removes what it does not hold",
            ),
            ("api", change(&[], &["192.0.2.0/24"]), "adds what it holds"),
        ] {
            let taken = w.apply_changes(&[(name.into(), c)]).unwrap();
            assert_eq!(taken, None, "{why}");
            assert_eq!(w.backend().ops, ops, "{why}: nothing written");
        }
        assert_eq!(w.backend().tables, before);
        // A network that is not folded cannot reach the writer: `Net` refuses it.
        let unfolded: IpNet = "::ffff:198.51.100.0/120".parse().unwrap();
        assert!(Net::new(unfolded).is_err(), "not folded");
        // The same writer takes a valid change.
        let taken = w.apply_changes(&[(
            "api".into(),
            change(&["192.0.2.0/24"], &["198.51.100.7/32"]),
        )]);
        assert!(taken.unwrap().is_some());
        let t = &w.backend().tables;
        assert_eq!(
            t.verdict(ip("198.51.100.7"), dst("192.0.2.1:1")),
            Some(true)
        );
        assert_eq!(t.verdict(ip("192.0.2.9"), dst("192.0.2.1:1")), Some(false));
    }

    #[test]
    fn a_policy_over_capacity_is_refused_before_any_write() {
        let capacity = MapCapacity {
            exact: 1,
            prefixes: 1,
        };
        let mut w = PolicyWriter::adopt(MemoryBackend::default())
            .unwrap()
            .with_capacity(capacity);
        w.apply(&policy(vec![restricted(
            "api",
            "[::]:1",
            &["192.0.2.1/32"],
        )]))
        .unwrap();
        let before = w.backend().tables.clone();
        let ops = w.backend().ops;
        let two = policy(vec![restricted(
            "api",
            "[::]:1",
            &["192.0.2.1/32", "192.0.2.2/32"],
        )]);
        let err = w.apply(&two).unwrap_err();
        assert_eq!(
            err.downcast_ref::<CapacityError>(),
            Some(&CapacityError::Exact {
                needed: 2,
                limit: 1
            }),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("datapath exact-match map full: 1 entries"),
            "{err}"
        );
        assert!(w.check_apply(&two).is_err(), "the dry run agrees");
        let added = Change {
            removed: BTreeSet::new(),
            added: ["192.0.2.3/32".parse().unwrap()].into(),
        };
        let err = w
            .apply_changes(&[("api".into(), added.clone())])
            .unwrap_err();
        assert_eq!(
            err.downcast_ref::<CapacityError>()
                .map(CapacityError::limit),
            Some(1)
        );
        assert_eq!(
            w.check_changes(&[("api".into(), added)]),
            Err(CapacityError::Exact {
                needed: 2,
                limit: 1
            })
        );
        let prefixes = policy(vec![restricted(
            "api",
            "[::]:1",
            &["192.0.2.1/32", "198.51.100.0/24", "203.0.113.0/24"],
        )]);
        let err = w.check_apply(&prefixes).unwrap_err();
        assert_eq!(
            err.downcast_ref::<CapacityError>().map(CapacityError::map),
            Some("prefixes")
        );
        assert_eq!((w.backend().ops, &w.backend().tables), (ops, &before));
    }

    #[test]
    fn a_change_needs_room_for_its_new_entries_before_the_old_ones_go() {
        let mut w = PolicyWriter::adopt(MemoryBackend::default())
            .unwrap()
            .with_capacity(MapCapacity {
                exact: 2,
                prefixes: 8,
            });
        let full = policy(vec![restricted(
            "api",
            "[::]:1",
            &["192.0.2.1/32", "192.0.2.2/32"],
        )]);
        w.apply(&full).unwrap();
        // Same count in the end, but .3 goes in while .2 is still there.
        let swap = policy(vec![restricted(
            "api",
            "[::]:1",
            &["192.0.2.1/32", "192.0.2.3/32"],
        )]);
        assert_eq!(
            w.check_apply(&swap)
                .unwrap_err()
                .downcast_ref::<CapacityError>(),
            Some(&CapacityError::Exact {
                needed: 3,
                limit: 2
            })
        );
        let swap_change = Change {
            removed: ["192.0.2.2/32".parse().unwrap()].into(),
            added: ["192.0.2.3/32".parse().unwrap()].into(),
        };
        assert!(w.check_changes(&[("api".into(), swap_change)]).is_err());
        // Room made first (a revoke), the same change fits and is written.
        let one = policy(vec![restricted("api", "[::]:1", &["192.0.2.1/32"])]);
        assert_eq!(w.check_apply(&one).ok(), Some(()));
        w.apply(&one).unwrap();
        assert_eq!(w.check_apply(&swap).ok(), Some(()));
        let add = Change {
            removed: BTreeSet::new(),
            added: ["192.0.2.3/32".parse().unwrap()].into(),
        };
        assert_eq!(
            w.check_changes(&[("api".into(), add.clone())]),
            Ok(Some(()))
        );
        assert!(w.apply_changes(&[("api".into(), add)]).unwrap().is_some());
        let t = &w.backend().tables;
        assert_eq!(t.verdict(ip("192.0.2.3"), dst("192.0.2.1:1")), Some(true));
        assert_eq!(t.exact.len(), 2);
    }

    /// The kernel refusing a write the writer thought would fit (another
    /// program filled the map, a race with a reload): the listener opens, the
    /// writer's picture stays the kernel's, and the next full apply closes it.
    /// A memory backend that notes each batch it is handed.
    #[derive(Default)]
    struct Batches {
        inner: MemoryBackend,
        calls: Vec<(&'static str, usize)>,
    }

    impl PolicyBackend for Batches {
        fn put_listener(&mut self, key: &ListenerKey, value: &ListenerValue) -> anyhow::Result<()> {
            self.inner.put_listener(key, value)
        }
        fn del_listener(&mut self, key: &ListenerKey) -> anyhow::Result<()> {
            self.inner.del_listener(key)
        }
        fn put_port(&mut self, port: u16, value: u32) -> anyhow::Result<()> {
            self.inner.put_port(port, value)
        }
        fn put_exact(&mut self, _: &PolicyAddr) -> anyhow::Result<()> {
            bail!("single exact write outside a batch")
        }
        fn del_exact(&mut self, _: &PolicyAddr) -> anyhow::Result<()> {
            bail!("single exact removal outside a batch")
        }
        fn put_prefix(&mut self, _: &PrefixKey, _: u32) -> anyhow::Result<()> {
            bail!("single prefix write outside a batch")
        }
        fn del_prefix(&mut self, _: &PrefixKey) -> anyhow::Result<()> {
            bail!("single prefix removal outside a batch")
        }
        fn put_exact_many(&mut self, keys: &[PolicyAddr]) -> anyhow::Result<()> {
            self.calls.push(("put exact", keys.len()));
            self.inner.put_exact_many(keys)
        }
        fn del_exact_many(&mut self, keys: &[PolicyAddr]) -> anyhow::Result<()> {
            self.calls.push(("del exact", keys.len()));
            self.inner.del_exact_many(keys)
        }
        fn put_prefix_many(&mut self, keys: &[PrefixKey], values: &[u32]) -> anyhow::Result<()> {
            assert_eq!(keys.len(), values.len(), "a value per prefix");
            self.calls.push(("put prefix", keys.len()));
            self.inner.put_prefix_many(keys, values)
        }
        fn del_prefix_many(&mut self, keys: &[PrefixKey]) -> anyhow::Result<()> {
            self.calls.push(("del prefix", keys.len()));
            self.inner.del_prefix_many(keys)
        }
        fn read_all(&self) -> anyhow::Result<PolicyTables> {
            self.inner.read_all()
        }
    }

    #[test]
    fn runs_of_one_kind_go_to_the_backend_in_batches() {
        let hosts: Vec<String> = (0..20_000u32)
            .map(|i| format!("2001:db8::{i:x}/128"))
            .collect();
        let nets: Vec<String> = (1..=9_000u32)
            .map(|i| format!("2001:db8:{i:x}::/48"))
            .collect();
        let all: Vec<&str> = hosts.iter().chain(&nets).map(String::as_str).collect();
        let mut w = PolicyWriter::adopt(Batches::default()).unwrap();
        w.apply(&policy(vec![restricted("api", "[::]:1", &all)]))
            .unwrap();
        let mut firsts = w.backend().calls.clone();
        firsts.sort_unstable();
        assert_eq!(
            firsts,
            [
                ("put exact", 3616),
                ("put exact", 8192),
                ("put exact", 8192),
                ("put prefix", 808),
                ("put prefix", 8192),
            ],
            "one call per {BATCH} writes of a kind"
        );
        let want = {
            let mut plain = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
            plain
                .apply(&policy(vec![restricted("api", "[::]:1", &all)]))
                .unwrap();
            plain.tables()
        };
        assert_eq!(w.backend().inner.tables.exact, want.exact);
        assert_eq!(w.backend().inner.tables.prefixes, want.prefixes);

        // Everything but one host and one network goes: removals batch too.
        w.backend.calls.clear();
        w.apply(&policy(vec![restricted(
            "api",
            "[::]:1",
            &[all[0], all[hosts.len()]],
        )]))
        .unwrap();
        let mut removals = w.backend().calls.clone();
        removals.sort_unstable();
        assert_eq!(
            removals,
            [
                ("del exact", 3615),
                ("del exact", 8192),
                ("del exact", 8192),
                ("del prefix", 807),
                ("del prefix", 8192),
            ]
        );
        assert_eq!(w.backend().inner.tables.exact.len(), 1);
        assert_eq!(w.backend().inner.tables.prefixes.len(), 1);
    }

    #[test]
    fn a_refused_kernel_write_opens_the_listener_until_a_full_apply() {
        let limit = Rc::new(Cell::new(2_usize));
        let mut w = PolicyWriter::adopt(Limited {
            inner: MemoryBackend::default(),
            exact_limit: limit.clone(),
        })
        .unwrap();
        let small = policy(vec![
            restricted("api", "[::]:1", &["192.0.2.1/32"]),
            restricted("other", "[::]:2", &["198.51.100.0/24"]),
        ]);
        w.apply(&small).unwrap();
        let big = policy(vec![
            restricted(
                "api",
                "[::]:1",
                &["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"],
            ),
            restricted("other", "[::]:2", &["198.51.100.0/24"]),
        ]);
        let err = w.apply(&big).unwrap_err();
        assert!(err.to_string().contains("kernel: map full"), "{err:#}");
        assert_eq!(w.tables(), w.backend().inner.tables, "read back");
        let t = &w.backend().inner.tables;
        assert_eq!(
            t.verdict(ip("192.0.2.3"), dst("192.0.2.1:1")),
            Some(false),
            "not yet open: the shim accepts .3, the datapath drops it"
        );
        let opened = w.open_uncovered(&big).unwrap();
        assert_eq!(opened, ["api"], "only the listener that lacks entries");
        let t = &w.backend().inner.tables;
        assert_eq!(t.verdict(ip("192.0.2.3"), dst("192.0.2.1:1")), Some(true));
        assert_eq!(t.verdict(ip("203.0.113.9"), dst("192.0.2.1:1")), Some(true));
        assert_eq!(
            t.verdict(ip("203.0.113.9"), dst("192.0.2.1:2")),
            Some(false),
            "the other listener stays restricted"
        );
        // Incremental changes cannot continue from a read-back state.
        let same = Change::default();
        assert_eq!(w.apply_changes(&[("api".into(), same)]).unwrap(), None);
        // Opening twice opens nothing more; still full, the apply fails
        // again before it switches any listener, so `api` stays open.
        assert_eq!(w.open_uncovered(&big).unwrap(), Vec::<String>::new());
        assert!(w.apply(&big).is_err());
        assert_eq!(w.open_uncovered(&big).unwrap(), Vec::<String>::new());
        let t = &w.backend().inner.tables;
        assert_eq!(t.verdict(ip("192.0.2.3"), dst("192.0.2.1:1")), Some(true));
        // Room again: a full apply closes the listener over complete entries.
        limit.set(8);
        w.apply(&big).unwrap();
        let t = &w.backend().inner.tables;
        assert_eq!(t.verdict(ip("192.0.2.3"), dst("192.0.2.1:1")), Some(true));
        assert_eq!(
            t.verdict(ip("203.0.113.9"), dst("192.0.2.1:1")),
            Some(false)
        );
        assert_eq!(w.open_uncovered(&big).unwrap(), Vec::<String>::new());
    }

    /// A kernel whose exact map holds fewer entries than the writer was told.
    struct Limited {
        inner: MemoryBackend,
        exact_limit: Rc<Cell<usize>>,
    }

    impl PolicyBackend for Limited {
        fn put_listener(&mut self, key: &ListenerKey, value: &ListenerValue) -> anyhow::Result<()> {
            self.inner.put_listener(key, value)
        }
        fn del_listener(&mut self, key: &ListenerKey) -> anyhow::Result<()> {
            self.inner.del_listener(key)
        }
        fn put_port(&mut self, port: u16, value: u32) -> anyhow::Result<()> {
            self.inner.put_port(port, value)
        }
        fn put_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()> {
            let t = &self.inner.tables;
            if !t.exact.contains(key) && t.exact.len() >= self.exact_limit.get() {
                bail!("kernel: map full (E2BIG)");
            }
            self.inner.put_exact(key)
        }
        fn del_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()> {
            self.inner.del_exact(key)
        }
        fn put_prefix(&mut self, key: &PrefixKey, value: u32) -> anyhow::Result<()> {
            self.inner.put_prefix(key, value)
        }
        fn del_prefix(&mut self, key: &PrefixKey) -> anyhow::Result<()> {
            self.inner.del_prefix(key)
        }
        fn read_all(&self) -> anyhow::Result<PolicyTables> {
            self.inner.read_all()
        }
    }

    #[test]
    fn too_many_listeners_is_an_error_and_changes_nothing() {
        let listeners = (1..=64)
            .map(|i| open(&format!("l{i}"), &format!("0.0.0.0:{i}")))
            .collect();
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        let err = w.apply(&policy(listeners)).unwrap_err();
        assert!(err.to_string().contains("no free slot"), "{err}");
        assert_eq!(
            err.downcast_ref::<CapacityError>(),
            Some(&CapacityError::Listeners { limit: 63 })
        );
        assert_eq!(w.backend().ops, 0);
    }

    /// A backend that checks, after every single operation, that every probe
    /// allowed both before and after the change is still allowed.
    struct Watched {
        inner: MemoryBackend,
        must_pass: Rc<RefCell<Vec<(IpAddr, SocketAddr)>>>,
        /// Fail the write with this number (counted from 0), once.
        fail_at: Rc<Cell<Option<usize>>>,
    }

    impl Watched {
        fn check(&self) -> anyhow::Result<()> {
            for (src, dst) in self.must_pass.borrow().iter() {
                if self.inner.tables.verdict(*src, *dst) != Some(true) {
                    bail!("{src} → {dst} dropped mid-apply");
                }
            }
            Ok(())
        }

        fn fail_now(&self) -> anyhow::Result<()> {
            match self.fail_at.get() {
                Some(0) => {
                    self.fail_at.set(None);
                    Err(anyhow::anyhow!("injected map write failure"))
                }
                Some(n) => {
                    self.fail_at.set(Some(n - 1));
                    Ok(())
                }
                None => Ok(()),
            }
        }
    }

    macro_rules! watched {
        ($($name:ident($($arg:ident: $ty:ty),*)),*) => {
            $(fn $name(&mut self, $($arg: $ty),*) -> anyhow::Result<()> {
                self.fail_now()?;
                self.inner.$name($($arg),*)?;
                self.check()
            })*
        };
    }

    impl PolicyBackend for Watched {
        watched!(
            put_listener(key: &ListenerKey, value: &ListenerValue),
            del_listener(key: &ListenerKey),
            put_port(port: u16, value: u32),
            put_exact(key: &PolicyAddr),
            del_exact(key: &PolicyAddr),
            put_prefix(key: &PrefixKey, value: u32),
            del_prefix(key: &PrefixKey)
        );
        fn read_all(&self) -> anyhow::Result<PolicyTables> {
            self.inner.read_all()
        }
        fn direct(&mut self) -> Option<&mut dyn DirectBackend> {
            Some(self)
        }
        fn read_direct(&self) -> anyhow::Result<DirectTables> {
            self.inner.read_direct()
        }
    }

    /// Whether a write to the direct tables at this index can change a
    /// probe's verdict (skipping the others keeps a `/0`'s 65,536 top
    /// writes cheap): top entries by /16, node entries by byte.
    fn probe_top(index: u32) -> bool {
        PROBES.iter().any(|p| match ip(p) {
            IpAddr::V4(v4) => u32::from(v4) >> 16 == index,
            IpAddr::V6(_) => false,
        })
    }

    fn probe_byte(at: usize) -> bool {
        PROBES.iter().any(|p| match ip(p) {
            IpAddr::V4(v4) => v4.octets()[2..].contains(&(at as u8)),
            IpAddr::V6(_) => false,
        })
    }

    /// The direct tables, checked like the other maps: after every write
    /// that can reach a probe.
    impl DirectBackend for Watched {
        fn mode(&self) -> anyhow::Result<u32> {
            self.inner.tables.direct.mode()
        }
        fn set_mode(&mut self, mode: u32) -> anyhow::Result<()> {
            self.fail_now()?;
            self.inner.tables.direct.set_mode(mode)?;
            self.check()
        }
        fn top_all(&self) -> anyhow::Result<Vec<u32>> {
            self.inner.tables.direct.top_all()
        }
        fn put_top(&mut self, index: u32, value: u32) -> anyhow::Result<()> {
            self.fail_now()?;
            self.inner.tables.direct.put_top(index, value)?;
            if probe_top(index) {
                self.check()
            } else {
                Ok(())
            }
        }
        fn node(&self, id: u32) -> anyhow::Result<crate::maps::direct::Node> {
            self.inner.tables.direct.node(id)
        }
        fn put_node(&mut self, id: u32, at: usize, value: u32) -> anyhow::Result<()> {
            self.fail_now()?;
            self.inner.tables.direct.put_node(id, at, value)?;
            if probe_byte(at) { self.check() } else { Ok(()) }
        }
        fn sets_all(&self) -> anyhow::Result<Vec<u64>> {
            self.inner.tables.direct.sets_all()
        }
        fn put_set(&mut self, id: u32, bits: u64) -> anyhow::Result<()> {
            self.fail_now()?;
            self.inner.tables.direct.put_set(id, bits)?;
            self.check()
        }
    }

    const PROBES: [&str; 12] = [
        "192.0.2.1",
        "192.0.2.77",
        "192.0.2.200",
        "198.51.100.5",
        "198.51.100.130",
        "203.0.113.9",
        "2001:db8::1",
        "2001:db8::ff",
        "2001:db8:1::5",
        "2001:db8:ffff::1",
        "::ffff:192.0.2.1",
        "0.0.0.0",
    ];
    const NETS: [&str; 17] = [
        "192.0.2.0/24",
        "192.0.2.0/25",
        "192.0.2.128/25",
        "192.0.2.1/32",
        "192.0.2.200/32",
        "198.51.100.0/24",
        "198.51.100.0/28",
        "203.0.113.9/32",
        "0.0.0.0/0",
        "2001:db8::/32",
        "2001:db8::/120",
        "2001:db8::1/128",
        "2001:db8:1::/48",
        "::/0",
        "::ffff:192.0.2.0/120",
        "::ffff:0:0/96",
        "::ffff:203.0.113.9/128",
    ];

    fn arb_listener(name: &'static str, port: u16) -> impl Strategy<Value = ListenerPolicy> {
        let mut binds = vec![
            format!("[::]:{port}"),
            format!("0.0.0.0:{port}"),
            format!("192.0.2.1:{port}"),
        ];
        if port == 3 {
            // Specific addresses on `a`'s port, beside its wildcard or its
            // own specific bind: the port table's full-lookup case.
            binds.extend(["192.0.2.9:1".into(), "[2001:db8::1]:1".into()]);
        }
        let binds = prop::sample::select(binds);
        let access = prop_oneof![
            1 => Just(Access::Open),
            5 => prop::sample::subsequence(NETS.to_vec(), 0..6).prop_map(|v| {
                Access::Restricted(Net::aggregate(
                    &v.iter().map(|n| n.parse().unwrap()).collect::<Vec<_>>(),
                ))
            }),
        ];
        (binds, access).prop_map(move |(bind, access)| ListenerPolicy {
            name: name.into(),
            bind: bind.parse().unwrap(),
            access,
        })
    }

    fn arb_policy() -> impl Strategy<Value = CompiledPolicy> {
        (
            prop::option::of(arb_listener("a", 1)),
            prop::option::of(arb_listener("b", 2)),
            prop::option::of(arb_listener("c", 3)),
        )
            .prop_map(|(a, b, c)| policy([a, b, c].into_iter().flatten().collect()))
    }

    fn probes() -> Vec<(IpAddr, SocketAddr)> {
        let dsts = ["192.0.2.1", "192.0.2.9", "2001:db8::1"];
        let mut out = Vec::new();
        for src in PROBES {
            for d in dsts {
                for port in 1..=3 {
                    out.push((ip(src), SocketAddr::new(ip(d), port)));
                }
            }
        }
        out
    }

    /// The verdicts `policy` gives every probe, from a writer that starts empty.
    fn fresh_tables(policy: &CompiledPolicy) -> PolicyTables {
        let mut fresh = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        fresh.apply(policy).unwrap();
        fresh.backend().tables.clone()
    }

    /// The port table agrees with the listener map: every probe gets the
    /// verdict the listener map alone gives (all ports on the full lookup).
    fn ports_agree(t: &PolicyTables) -> Result<(), TestCaseError> {
        let mut full = t.clone();
        full.ports = t
            .listeners
            .keys()
            .map(|k| (u16::from_be_bytes(k.port), PORT_SPECIFIC))
            .collect();
        prop_assert_eq!(ports_of(&t.listeners), t.ports.clone());
        for (s, d) in probes() {
            prop_assert_eq!(t.verdict(s, d), full.verdict(s, d), "{} → {}", s, d);
        }
        Ok(())
    }

    fn both_allow(a: &PolicyTables, b: &PolicyTables) -> Vec<(IpAddr, SocketAddr)> {
        probes()
            .into_iter()
            .filter(|(s, d)| a.verdict(*s, *d) == Some(true) && b.verdict(*s, *d) == Some(true))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// No write of any apply drops a flow allowed before and after; after
        /// each apply the maps give exactly the new policy's verdicts and the
        /// writer's picture of them is exact. Covers the first apply, a
        /// restart in between (adopted entries), a write failing half-way (the
        /// writer reads the maps back) and the merge path of a later apply.
        #[test]
        fn applies_never_drop_what_both_sides_allow(
            before in arb_policy(),
            middle in arb_policy(),
            after in arb_policy(),
            restart in any::<bool>(),
            fail_at in prop::option::of(0..24_usize),
            rounds in prop::collection::vec(
                prop::collection::vec(prop::sample::subsequence(NETS.to_vec(), 0..6), 3),
                1..4,
            ),
        ) {
            let must_pass = Rc::new(RefCell::new(Vec::new()));
            let fail = Rc::new(Cell::new(None));
            let backend = Watched {
                inner: MemoryBackend::default(),
                must_pass: must_pass.clone(),
                fail_at: fail.clone(),
            };
            let mut w = PolicyWriter::adopt(backend).unwrap();
            w.apply(&before).unwrap();
            if restart {
                let Watched { inner, must_pass, fail_at } = w.backend;
                w = PolicyWriter::adopt(Watched { inner, must_pass, fail_at }).unwrap();
            }
            let before_tables = w.backend().inner.tables.clone();
            prop_assert_eq!(w.tables(), before_tables.clone());

            let middle_tables = fresh_tables(&middle);
            *must_pass.borrow_mut() = both_allow(&before_tables, &middle_tables);
            fail.set(fail_at);
            if let Err(e) = w.apply(&middle) {
                prop_assert!(e.to_string().contains("injected"), "{e:#}");
                prop_assert_eq!(w.tables(), w.backend().inner.tables.clone());
                // Failing open: every flow the new policy allows passes now.
                w.open_uncovered(&middle).unwrap();
                prop_assert_eq!(w.tables(), w.backend().inner.tables.clone());
                ports_agree(&w.backend().inner.tables)?;
                for (s, d) in probes() {
                    // `None`: no listener there, the packet passes too.
                    if middle_tables.verdict(s, d) == Some(true) {
                        prop_assert_ne!(
                            w.backend().inner.tables.verdict(s, d),
                            Some(false),
                            "open after a failure: {} → {}", s, d
                        );
                    }
                }
                w.apply(&middle).unwrap();
            }
            fail.set(None);
            prop_assert_eq!(w.tables(), w.backend().inner.tables.clone());
            ports_agree(&w.backend().inner.tables)?;
            for (s, d) in probes() {
                prop_assert_eq!(
                    w.backend().inner.tables.verdict(s, d),
                    middle_tables.verdict(s, d),
                    "{} → {}", s, d
                );
            }

            let after_tables = fresh_tables(&after);
            *must_pass.borrow_mut() = both_allow(&middle_tables, &after_tables);
            w.apply(&after).unwrap();
            prop_assert_eq!(w.tables(), w.backend().inner.tables.clone());
            ports_agree(&w.backend().inner.tables)?;
            for (s, d) in probes() {
                prop_assert_eq!(
                    w.backend().inner.tables.verdict(s, d),
                    after_tables.verdict(s, d),
                    "{} → {}", s, d
                );
            }

            // Rounds of changes to every restricted listener, written
            // without a full apply (a sync after the first visits only the
            // /16s a change reaches).
            let mut last = after.clone();
            let mut last_tables = after_tables;
            for targets in &rounds {
                let mut changes = Vec::new();
                for (listener, target) in last.listeners.iter_mut().zip(targets) {
                    let Access::Restricted(nets) = &mut listener.access else {
                        continue;
                    };
                    let have: BTreeSet<Net> = in_order(nets).into_iter().collect();
                    let want: BTreeSet<Net> = target.iter().map(|n| n.parse().unwrap()).collect();
                    changes.push((listener.name.clone(), Change {
                        removed: have.difference(&want).copied().collect(),
                        added: want.difference(&have).copied().collect(),
                    }));
                    *nets = want.into_iter().collect();
                }
                let next_tables = fresh_tables(&last);
                *must_pass.borrow_mut() = both_allow(&last_tables, &next_tables);
                let report = w.apply_changes(&changes).unwrap();
                prop_assert!(report.is_some(), "the writer wrote every listener");
                prop_assert_eq!(w.tables(), w.backend().inner.tables.clone());
                for (s, d) in probes() {
                    prop_assert_eq!(
                        w.backend().inner.tables.verdict(s, d),
                        next_tables.verdict(s, d),
                        "{} → {}", s, d
                    );
                }
                last_tables = next_tables;
            }
        }
    }
}
