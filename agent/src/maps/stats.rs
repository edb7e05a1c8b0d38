//! `KF_STATS`: per-CPU verdict counters, read back summed over CPUs.

use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use keyfence_common::{
    map_names,
    policy::MAX_LISTENERS,
    stats::{STAT_SLOTS, Stat, StatBlock, stats_index},
};

use crate::maps::MapSource;

/// Counters summed over CPUs, per (interface slot, listener slot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    blocks: BTreeMap<(u32, u32), [u64; STAT_SLOTS]>,
}

impl CounterSnapshot {
    #[must_use]
    pub fn get(&self, iface_slot: u32, listener_slot: u32, stat: Stat) -> u64 {
        self.blocks
            .get(&(iface_slot, listener_slot))
            .map_or(0, |b| b[stat as usize])
    }

    /// Every non-zero counter: `(iface slot, listener slot, stat, packets)`.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32, Stat, u64)> + '_ {
        self.blocks.iter().flat_map(|(&(i, l), block)| {
            Stat::ALL
                .into_iter()
                .map(move |s| (i, l, s, block[s as usize]))
                .filter(|(_, _, _, n)| *n > 0)
        })
    }

    /// Sums over interfaces, by listener slot (only slots with a count).
    #[must_use]
    pub fn by_listener(&self) -> BTreeMap<u32, [u64; STAT_SLOTS]> {
        let mut sums: BTreeMap<u32, [u64; STAT_SLOTS]> = BTreeMap::new();
        for (&(_, listener), block) in &self.blocks {
            let sum = sums.entry(listener).or_insert([0; STAT_SLOTS]);
            for (total, n) in sum.iter_mut().zip(block) {
                *total = total.wrapping_add(*n);
            }
        }
        sums
    }

    /// Sum over every interface and listener.
    #[must_use]
    pub fn total(&self, stat: Stat) -> u64 {
        self.blocks.values().map(|b| b[stat as usize]).sum()
    }
}

pub struct Counters {
    map: PerCpuArray<MapData, StatBlock>,
}

impl Counters {
    pub fn open(maps: &mut MapSource<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            map: maps.map(map_names::STATS)?,
        })
    }

    /// Read the blocks of the given interface slots × every listener slot.
    pub fn snapshot(&self, iface_slots: &[u32]) -> anyhow::Result<CounterSnapshot> {
        let mut blocks = BTreeMap::new();
        for &iface in iface_slots {
            for listener in 0..MAX_LISTENERS {
                let per_cpu = self
                    .map
                    .get(&stats_index(iface, listener), 0)
                    .context("reading KF_STATS")?;
                let mut sum = [0u64; STAT_SLOTS];
                for block in per_cpu.iter() {
                    for (total, n) in sum.iter_mut().zip(block.packets) {
                        *total = total.wrapping_add(n);
                    }
                }
                if sum.iter().any(|n| *n > 0) {
                    blocks.insert((iface, listener), sum);
                }
            }
        }
        Ok(CounterSnapshot { blocks })
    }

    /// Zero a listener slot's counters on every interface, so a slot handed to a
    /// different listener does not inherit its predecessor's counts.
    pub fn clear_listener(&mut self, listener_slot: u32, iface_slots: u32) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        for iface in 0..iface_slots {
            let zeros = PerCpuValues::try_from(vec![
                StatBlock {
                    packets: [0; STAT_SLOTS]
                };
                cpus
            ])
            .context("building per-CPU zeros")?;
            self.map
                .set(stats_index(iface, listener_slot), zeros, 0)
                .context("clearing KF_STATS")?;
        }
        Ok(())
    }
}
