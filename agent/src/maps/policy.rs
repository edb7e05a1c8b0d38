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
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use keyfence_common::{
    PROTO_TCP, WILDCARD_V4, WILDCARD_V6, ipv4_mapped,
    policy::{
        ALLOWED, DENIED, EXACT_CAPACITY, LISTENER_OPEN, ListenerKey, ListenerValue, MAX_LISTENERS,
        POLICY_BITS, PREFIXES_CAPACITY, PolicyAddr, V4_MAPPED_BITS,
    },
};

use crate::policy::{Access, CompiledPolicy};

/// A trie entry: `(prefix length in bits including the policy id, key)`.
pub type PrefixKey = (u32, PolicyAddr);

/// The contents of the policy maps (what the kernel holds, or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    pub listeners: BTreeMap<ListenerKey, ListenerValue>,
    pub exact: BTreeSet<PolicyAddr>,
    pub prefixes: BTreeMap<PrefixKey, u32>,
}

/// Where the writer's operations go: the kernel maps, or memory in tests.
pub trait PolicyBackend {
    fn put_listener(&mut self, key: &ListenerKey, value: &ListenerValue) -> anyhow::Result<()>;
    fn del_listener(&mut self, key: &ListenerKey) -> anyhow::Result<()>;
    fn put_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()>;
    fn del_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()>;
    fn put_prefix(&mut self, key: &PrefixKey, value: u32) -> anyhow::Result<()>;
    fn del_prefix(&mut self, key: &PrefixKey) -> anyhow::Result<()>;
    /// Everything currently stored (used once, to adopt pinned maps on start).
    fn read_all(&self) -> anyhow::Result<PolicyTables>;
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

/// One network as datapath entries of `policy`: `/32` and `/128` go to the exact
/// hash, everything else to the trie.
fn add_net(policy: u32, net: IpNet, tables: &mut PolicyTables) {
    match net {
        IpNet::V4(v4) if v4.prefix_len() == 32 => {
            tables
                .exact
                .insert(PolicyAddr::new(policy, ipv4_mapped(v4.addr().octets())));
        }
        IpNet::V6(v6) if v6.prefix_len() == 128 => {
            tables
                .exact
                .insert(PolicyAddr::new(policy, v6.addr().octets()));
        }
        IpNet::V4(v4) => {
            let len = POLICY_BITS + V4_MAPPED_BITS + u32::from(v4.prefix_len());
            let key = PolicyAddr::new(policy, ipv4_mapped(v4.network().octets()));
            tables.prefixes.insert((len, key), ALLOWED);
        }
        IpNet::V6(v6) => {
            let len = POLICY_BITS + u32::from(v6.prefix_len());
            let key = PolicyAddr::new(policy, v6.network().octets());
            tables.prefixes.insert((len, key), ALLOWED);
        }
    }
}

/// The trie key of `::ffff:0:0/96` (which is also how `0.0.0.0/0` is stored).
fn v4_space(policy: u32) -> PrefixKey {
    (
        POLICY_BITS + V4_MAPPED_BITS,
        PolicyAddr::new(policy, ipv4_mapped([0; 4])),
    )
}

/// The entries of one restricted policy.
fn policy_entries(policy: u32, nets: &[IpNet], tables: &mut PolicyTables) {
    let mapped_space: IpNet = "::ffff:0:0/96".parse().expect("constant network");
    let mut covers_v4_space = false;
    for &net in nets {
        if let IpNet::V6(v6) = net
            && v6.prefix_len() <= 96
            && IpNet::V6(v6).contains(&mapped_space)
        {
            covers_v4_space = true;
        }
        add_net(policy, net, tables);
    }
    // An IPv6 prefix never admits an IPv4 client (SPEC §3); in the trie IPv4 lives
    // inside ::ffff:0:0/96, so shadow that space unless 0.0.0.0/0 is itself allowed
    // (same trie key, value ALLOWED).
    if covers_v4_space {
        tables.prefixes.entry(v4_space(policy)).or_insert(DENIED);
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

/// Moves the kernel maps from policy to policy; keeps a mirror of what it wrote.
pub struct PolicyWriter<B> {
    backend: B,
    current: PolicyTables,
    slots: SlotMap,
}

impl<B: PolicyBackend> PolicyWriter<B> {
    /// Adopt whatever the maps hold now (empty on a first start, the previous
    /// agent's policy after a restart) as the starting point of the next diff.
    pub fn adopt(backend: B) -> anyhow::Result<Self> {
        let current = backend
            .read_all()
            .context("reading the pinned policy maps")?;
        Ok(Self {
            backend,
            current,
            slots: SlotMap::default(),
        })
    }

    #[must_use]
    pub fn slots(&self) -> &SlotMap {
        &self.slots
    }

    #[must_use]
    pub fn tables(&self) -> &PolicyTables {
        &self.current
    }

    #[must_use]
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Slot for each listener: keep the slot its bind already has in the maps,
    /// otherwise take a slot that no current entry uses.
    fn assign_slots(&self, policy: &CompiledPolicy) -> anyhow::Result<Vec<u32>> {
        let in_use: BTreeSet<u32> = self
            .current
            .listeners
            .values()
            .map(|v| v.policy)
            .chain(self.current.exact.iter().map(PolicyAddr::policy))
            .chain(self.current.prefixes.keys().map(|(_, k)| k.policy()))
            .collect();
        let mut taken = BTreeSet::new();
        let mut slots = Vec::with_capacity(policy.listeners.len());
        let mut pending = Vec::new();
        for (i, listener) in policy.listeners.iter().enumerate() {
            let existing = listener_keys(listener.bind)
                .iter()
                .find_map(|k| self.current.listeners.get(k))
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
                bail!(
                    "more than {} listeners: the datapath has no free slot",
                    MAX_LISTENERS - 1
                );
            };
            slots[i] = slot;
        }
        Ok(slots)
    }

    /// The tables `policy` needs, with the slots it will use.
    pub fn desired(&self, policy: &CompiledPolicy) -> anyhow::Result<(PolicyTables, SlotMap)> {
        let slots = self.assign_slots(policy)?;
        let mut tables = PolicyTables::default();
        let mut slot_map = SlotMap::default();
        for (listener, &slot) in policy.listeners.iter().zip(&slots) {
            let flags = match &listener.access {
                Access::Open => LISTENER_OPEN,
                Access::Restricted(nets) => {
                    policy_entries(slot, nets, &mut tables);
                    0
                }
            };
            for key in listener_keys(listener.bind) {
                tables.listeners.insert(
                    key,
                    ListenerValue {
                        policy: slot,
                        flags,
                    },
                );
            }
            slot_map.by_name.insert(listener.name.clone(), slot);
        }
        if tables.exact.len() > EXACT_CAPACITY as usize {
            bail!(
                "the policy needs {} /32 and /128 entries; the datapath holds {EXACT_CAPACITY}",
                tables.exact.len()
            );
        }
        if tables.prefixes.len() > PREFIXES_CAPACITY as usize {
            bail!(
                "the policy needs {} prefix entries; the datapath holds {PREFIXES_CAPACITY}",
                tables.prefixes.len()
            );
        }
        Ok((tables, slot_map))
    }

    /// Make the maps enforce `policy`. On error the maps hold a safe intermediate
    /// state (never narrower than before ∩ after) that the mirror describes
    /// exactly, so the next apply continues from there.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> anyhow::Result<ApplyReport> {
        let (want, slots) = self.desired(policy)?;
        let mut report = ApplyReport::default();

        // 1. New allows first.
        for key in want.exact.difference(&self.current.exact.clone()) {
            self.backend.put_exact(key)?;
            self.current.exact.insert(*key);
            report.added += 1;
        }
        for (key, &value) in &want.prefixes {
            let have = self.current.prefixes.get(key).copied();
            let widen = match have {
                None => true,
                Some(old) => old != value && value == ALLOWED,
            };
            if widen {
                self.backend.put_prefix(key, value)?;
                self.current.prefixes.insert(*key, value);
                if have.is_some() {
                    report.updated += 1;
                } else {
                    report.added += 1;
                }
            }
        }
        // 2. Listeners now point at complete entries.
        for (key, value) in &want.listeners {
            if self.current.listeners.get(key) != Some(value) {
                self.backend.put_listener(key, value)?;
                self.current.listeners.insert(*key, *value);
                report.updated += 1;
            }
        }
        // 3. Listeners that are gone.
        let gone: Vec<ListenerKey> = self
            .current
            .listeners
            .keys()
            .filter(|k| !want.listeners.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.backend.del_listener(&key)?;
            self.current.listeners.remove(&key);
            report.removed += 1;
        }
        // 4. Narrowing last.
        for (key, &value) in &want.prefixes {
            if self
                .current
                .prefixes
                .get(key)
                .is_some_and(|&old| old != value)
            {
                self.backend.put_prefix(key, value)?;
                self.current.prefixes.insert(*key, value);
                report.updated += 1;
            }
        }
        let stale_prefixes: Vec<PrefixKey> = self
            .current
            .prefixes
            .keys()
            .filter(|k| !want.prefixes.contains_key(k))
            .copied()
            .collect();
        for key in stale_prefixes {
            self.backend.del_prefix(&key)?;
            self.current.prefixes.remove(&key);
            report.removed += 1;
        }
        let stale_exact: Vec<PolicyAddr> = self
            .current
            .exact
            .difference(&want.exact)
            .copied()
            .collect();
        for key in stale_exact {
            self.backend.del_exact(&key)?;
            self.current.exact.remove(&key);
            report.removed += 1;
        }
        debug_assert_eq!(self.current, want);
        self.slots = slots;
        Ok(report)
    }
}

/// The policy maps held in memory, with the kernel's lookup semantics: used by
/// unit tests of the writer and by anything that needs a verdict without a kernel.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    pub tables: PolicyTables,
    /// Called after every operation (tests check invariants mid-apply).
    pub ops: usize,
}

impl PolicyTables {
    /// The verdict the datapath gives a TCP packet from `src` to `dst`:
    /// `None` = no listener, `Some(true)` = pass, `Some(false)` = drop.
    #[must_use]
    pub fn verdict(&self, src: IpAddr, dst: SocketAddr) -> Option<bool> {
        let to16 = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        let v4 = matches!(dst.ip(), IpAddr::V4(_));
        let exact = ListenerKey::new(to16(dst.ip()), dst.port(), PROTO_TCP);
        let wild = ListenerKey::new(
            if v4 { WILDCARD_V4 } else { WILDCARD_V6 },
            dst.port(),
            PROTO_TCP,
        );
        let value = self
            .listeners
            .get(&exact)
            .or_else(|| self.listeners.get(&wild))?;
        if value.flags & LISTENER_OPEN != 0 {
            return Some(true);
        }
        let addr = to16(src);
        if self.exact.contains(&PolicyAddr::new(value.policy, addr)) {
            return Some(true);
        }
        // Longest prefix match over (policy, addr).
        let full = {
            let mut b = [0u8; 20];
            b[..4].copy_from_slice(&value.policy.to_be_bytes());
            b[4..].copy_from_slice(&addr);
            u160(&b)
        };
        let best = self
            .prefixes
            .iter()
            .filter(|((len, key), _)| {
                let mut b = [0u8; 20];
                b[..4].copy_from_slice(&key.policy_be);
                b[4..].copy_from_slice(&key.addr);
                prefix_match(u160(&b), full, *len)
            })
            .max_by_key(|((len, _), _)| *len);
        Some(best.is_some_and(|(_, v)| *v == ALLOWED))
    }
}

fn u160(b: &[u8; 20]) -> (u32, u128) {
    (
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u128::from_be_bytes(b[4..].try_into().expect("16 bytes")),
    )
}

fn prefix_match(net: (u32, u128), addr: (u32, u128), len: u32) -> bool {
    if net.0 != addr.0 {
        return false;
    }
    let bits = len.saturating_sub(POLICY_BITS);
    if bits == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - bits.min(128));
    net.1 & mask == addr.1 & mask
}

impl PolicyBackend for MemoryBackend {
    fn put_listener(&mut self, key: &ListenerKey, value: &ListenerValue) -> anyhow::Result<()> {
        self.tables.listeners.insert(*key, *value);
        self.ops += 1;
        Ok(())
    }
    fn del_listener(&mut self, key: &ListenerKey) -> anyhow::Result<()> {
        self.tables.listeners.remove(key);
        self.ops += 1;
        Ok(())
    }
    fn put_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()> {
        self.tables.exact.insert(*key);
        self.ops += 1;
        Ok(())
    }
    fn del_exact(&mut self, key: &PolicyAddr) -> anyhow::Result<()> {
        self.tables.exact.remove(key);
        self.ops += 1;
        Ok(())
    }
    fn put_prefix(&mut self, key: &PrefixKey, value: u32) -> anyhow::Result<()> {
        self.tables.prefixes.insert(*key, value);
        self.ops += 1;
        Ok(())
    }
    fn del_prefix(&mut self, key: &PrefixKey) -> anyhow::Result<()> {
        self.tables.prefixes.remove(key);
        self.ops += 1;
        Ok(())
    }
    fn read_all(&self) -> anyhow::Result<PolicyTables> {
        Ok(self.tables.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use proptest::prelude::*;

    use super::*;
    use crate::policy::ListenerPolicy;

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
    fn too_many_listeners_is_an_error_and_changes_nothing() {
        let listeners = (1..=64)
            .map(|i| open(&format!("l{i}"), &format!("0.0.0.0:{i}")))
            .collect();
        let mut w = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
        let err = w.apply(&policy(listeners)).unwrap_err();
        assert!(err.to_string().contains("no free slot"), "{err}");
        assert_eq!(w.backend().ops, 0);
    }

    /// A backend that checks, after every single operation, that every probe
    /// allowed both before and after the change is still allowed.
    struct Watched {
        inner: MemoryBackend,
        must_pass: Rc<RefCell<Vec<(IpAddr, SocketAddr)>>>,
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
    }

    macro_rules! watched {
        ($($name:ident($($arg:ident: $ty:ty),*)),*) => {
            $(fn $name(&mut self, $($arg: $ty),*) -> anyhow::Result<()> {
                self.inner.$name($($arg),*)?;
                self.check()
            })*
        };
    }

    impl PolicyBackend for Watched {
        watched!(
            put_listener(key: &ListenerKey, value: &ListenerValue),
            del_listener(key: &ListenerKey),
            put_exact(key: &PolicyAddr),
            del_exact(key: &PolicyAddr),
            put_prefix(key: &PrefixKey, value: u32),
            del_prefix(key: &PrefixKey)
        );
        fn read_all(&self) -> anyhow::Result<PolicyTables> {
            self.inner.read_all()
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
    const NETS: [&str; 14] = [
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
    ];

    fn arb_listener(name: &'static str, port: u16) -> impl Strategy<Value = ListenerPolicy> {
        let binds = prop::sample::select(vec![
            format!("[::]:{port}"),
            format!("0.0.0.0:{port}"),
            format!("192.0.2.1:{port}"),
        ]);
        let access = prop_oneof![
            1 => Just(Access::Open),
            5 => prop::sample::subsequence(NETS.to_vec(), 0..6).prop_map(|v| {
                Access::Restricted(IpNet::aggregate(
                    &v.iter().map(|n| n.parse().unwrap()).collect(),
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// No operation sequence of any apply drops a flow allowed before and after,
        /// and after the apply the maps give exactly the new policy's verdicts.
        #[test]
        fn applies_never_drop_what_both_sides_allow(
            before in arb_policy(),
            after in arb_policy(),
        ) {
            let must_pass = Rc::new(RefCell::new(Vec::new()));
            let backend = Watched { inner: MemoryBackend::default(), must_pass: must_pass.clone() };
            let mut w = PolicyWriter::adopt(backend).unwrap();
            w.apply(&before).unwrap();
            let before_tables = w.backend().inner.tables.clone();

            let mut fresh = PolicyWriter::adopt(MemoryBackend::default()).unwrap();
            fresh.apply(&after).unwrap();
            let after_tables = fresh.backend().tables.clone();

            let both: Vec<_> = probes()
                .into_iter()
                .filter(|(s, d)| {
                    before_tables.verdict(*s, *d) == Some(true)
                        && after_tables.verdict(*s, *d) == Some(true)
                })
                .collect();
            *must_pass.borrow_mut() = both;
            w.apply(&after).unwrap();
            for (s, d) in probes() {
                prop_assert_eq!(
                    w.backend().inner.tables.verdict(s, d),
                    after_tables.verdict(s, d),
                    "{} → {}", s, d
                );
            }
        }
    }
}
