//! The maps held in memory, for tests only (`cfg(test)` or the `test-support`
//! feature; the agent binary never holds them): backends the writers can
//! drive without a kernel, and the one reference model of the datapath's map
//! lookups, shared by the writers' unit tests and by the tests crate
//! (`tests/src/refmodel.rs` parses the packet, this decides it).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use keyfence_common::{
    PROTO_TCP, WILDCARD_V4, WILDCARD_V6, ipv4_mapped,
    policy::{
        ALLOWED, LISTENER_OPEN, ListenerKey, ListenerValue, MAX_LISTENERS, POLICY_BITS,
        PORT_SPECIFIC, PolicyAddr, port_listener,
    },
    stats::Stat,
    unparsed::{UNPARSED_CAPACITY, UnparsedKey},
};

use super::{
    direct::{DirectBackend, DirectTables},
    policy::{PolicyBackend, PolicyTables, PrefixKey},
    unparsed::UnparsedBackend,
};

/// The policy maps held in memory: what a writer wrote, to compare with the
/// policy through [`PolicyTables::verdict`].
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    pub tables: PolicyTables,
    /// Called after every operation (tests check invariants mid-apply).
    pub ops: usize,
}

/// A parsed packet as the map lookups see it: addresses in the maps' 16-byte
/// form (IPv4 mapped), the destination port in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// An IPv4 packet (an IPv6 one to a mapped address is not).
    pub v4: bool,
}

impl PolicyTables {
    /// The datapath's decision for `flow` under these maps (SPEC §7):
    /// `(why, listener slot counted under)`. For TCP the port table is read
    /// first and the listener map only where a listener binds a specific
    /// address, as the kernel does.
    #[must_use]
    pub fn decide(&self, flow: &Flow) -> (Stat, u32) {
        let port = if flow.proto == PROTO_TCP {
            self.ports.get(&flow.port).copied().unwrap_or(0)
        } else {
            PORT_SPECIFIC
        };
        let found = match port {
            0 => None,
            p if p & PORT_SPECIFIC == 0 => port_listener(p, flow.v4),
            _ => {
                let exact = ListenerKey::new(flow.dst, flow.port, flow.proto);
                let wild = ListenerKey::new(
                    if flow.v4 { WILDCARD_V4 } else { WILDCARD_V6 },
                    flow.port,
                    flow.proto,
                );
                self.listeners
                    .get(&exact)
                    .or_else(|| self.listeners.get(&wild))
                    .copied()
            }
        };
        let Some(listener) = found else {
            return (Stat::PassNoListener, 0);
        };
        let slot = listener.policy;
        if slot == 0 || slot >= MAX_LISTENERS {
            return (Stat::PassMapError, 0);
        }
        if listener.flags & LISTENER_OPEN != 0 {
            return (Stat::PassListenerOpen, slot);
        }
        // The kernel reads the direct tables for IPv4 packets, whose sources
        // are always mapped; a probe mixing families takes the trie.
        if flow.v4
            && flow.src[..12] == ipv4_mapped([0; 4])[..12]
            && let Some(allowed) = self.direct.lookup(u32::from_be_bytes([
                flow.src[12],
                flow.src[13],
                flow.src[14],
                flow.src[15],
            ]))
        {
            return if (allowed >> slot) & 1 != 0 {
                (Stat::PassAllowedDirect, slot)
            } else {
                (Stat::DropNotAllowed, slot)
            };
        }
        if self.exact.contains(&PolicyAddr::new(slot, flow.src)) {
            return (Stat::PassAllowedExact, slot);
        }
        // The longest prefix over (policy id, address) decides.
        let longest = self
            .prefixes
            .iter()
            .filter(|((len, key), _)| covers(*len, key, slot, &flow.src))
            .max_by_key(|((len, _), _)| *len);
        match longest {
            Some((_, &ALLOWED)) => (Stat::PassAllowedPrefix, slot),
            _ => (Stat::DropNotAllowed, slot),
        }
    }

    /// The verdict for a TCP packet from `src` to `dst`: `None` = no
    /// listener, `Some(true)` = pass, `Some(false)` = drop.
    #[must_use]
    pub fn verdict(&self, src: IpAddr, dst: SocketAddr) -> Option<bool> {
        let to16 = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        let (stat, _) = self.decide(&Flow {
            src: to16(src),
            dst: to16(dst.ip()),
            port: dst.port(),
            proto: PROTO_TCP,
            v4: dst.is_ipv4(),
        });
        (stat != Stat::PassNoListener).then_some(!stat.is_drop())
    }
}

/// Does the trie entry `(len, key)` cover `(policy, addr)`?
fn covers(len: u32, key: &PolicyAddr, policy: u32, addr: &[u8; 16]) -> bool {
    if key.policy() != policy {
        return false;
    }
    let bits = len.saturating_sub(POLICY_BITS).min(128);
    if bits == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - bits);
    u128::from_be_bytes(key.addr) & mask == u128::from_be_bytes(*addr) & mask
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
    fn put_port(&mut self, port: u16, value: u32) -> anyhow::Result<()> {
        if value == 0 {
            self.tables.ports.remove(&port);
        } else {
            self.tables.ports.insert(port, value);
        }
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
    fn direct(&mut self) -> Option<&mut dyn DirectBackend> {
        Some(&mut self.tables.direct)
    }
    fn read_direct(&self) -> anyhow::Result<DirectTables> {
        Ok(self.tables.direct.clone())
    }
}

/// `KF_UNPARSED` in memory, as full as the kernel's at its capacity.
impl UnparsedBackend for BTreeSet<UnparsedKey> {
    fn put(&mut self, key: &UnparsedKey) -> anyhow::Result<()> {
        if self.len() >= UNPARSED_CAPACITY as usize && !self.contains(key) {
            anyhow::bail!("KF_UNPARSED is full");
        }
        self.insert(*key);
        Ok(())
    }
    fn del(&mut self, key: &UnparsedKey) -> anyhow::Result<()> {
        self.remove(key);
        Ok(())
    }
    fn read_all(&self) -> anyhow::Result<BTreeSet<UnparsedKey>> {
        Ok(self.clone())
    }
}
