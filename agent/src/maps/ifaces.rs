//! `KF_IFINDEX_SLOTS`: ifindex → interface slot, so counters carry an interface label.

use anyhow::{Context as _, bail};
use aya::maps::{Array, MapData};
use keyfence_common::stats::{IFINDEX_SLOTS_CAPACITY, MAX_IFACE_SLOTS};

pub struct IfaceSlots {
    map: Array<MapData, u32>,
}

impl IfaceSlots {
    #[must_use]
    pub fn new(map: Array<MapData, u32>) -> Self {
        Self { map }
    }

    /// Make `slots` (ifindex, slot) the only assignments: stale ones from a
    /// previous run (interfaces since removed from the config) are cleared.
    pub fn assign(&mut self, slots: &[(u32, u32)]) -> anyhow::Result<()> {
        for &(ifindex, slot) in slots {
            if slot == 0 || slot >= MAX_IFACE_SLOTS {
                bail!("at most {} interfaces are supported", MAX_IFACE_SLOTS - 1);
            }
            if ifindex >= IFINDEX_SLOTS_CAPACITY {
                tracing::warn!(
                    ifindex,
                    "ifindex beyond {IFINDEX_SLOTS_CAPACITY}: its packets are counted as interface \"other\""
                );
                continue;
            }
            self.map
                .set(ifindex, slot, 0)
                .context("writing KF_IFINDEX_SLOTS")?;
        }
        let stale: Vec<u32> = self
            .map
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Ok(s) if s != 0 => Some(i as u32),
                _ => None,
            })
            .filter(|i| !slots.iter().any(|(ifindex, _)| ifindex == i))
            .collect();
        for ifindex in stale {
            self.map
                .set(ifindex, 0, 0)
                .context("clearing KF_IFINDEX_SLOTS")?;
        }
        Ok(())
    }
}
