//! `KF_IFINDEX_SLOTS`: ifindex → interface slot, so counters carry an interface label.

use anyhow::{Context as _, bail};
use aya::maps::{Array, MapData};
use keyfence_common::{
    map_names,
    stats::{IFINDEX_SLOTS_CAPACITY, MAX_IFACE_SLOTS},
};

use crate::maps::MapSource;

pub struct IfaceSlots {
    map: Array<MapData, u32>,
}

impl IfaceSlots {
    pub fn open(maps: &mut MapSource<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            map: maps.map(map_names::IFINDEX_SLOTS)?,
        })
    }

    /// Every assignment `(ifindex, slot)` the map holds, by ifindex.
    pub fn assigned(&self) -> anyhow::Result<Vec<(u32, u32)>> {
        let mut out = Vec::new();
        for (ifindex, slot) in self.map.iter().enumerate() {
            let slot = slot.context("reading KF_IFINDEX_SLOTS")?;
            if slot != 0 {
                out.push((u32::try_from(ifindex).unwrap_or(u32::MAX), slot));
            }
        }
        Ok(out)
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
