//! `keyfence status`: what is attached where, map fill against capacity, and
//! the counters, read from the pinned maps (through the `maps` wrappers) and
//! links. It works while the agent is down too: that is when the pins are
//! what enforces.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use keyfence_common::{
    policy::{LISTENER_OPEN, LISTENERS_CAPACITY},
    stats::{MAX_IFACE_SLOTS, STAT_SLOTS, Stat},
};
use serde::Serialize;

use crate::{
    config::Config,
    datapath::{AttachedMode, pin_dir, pinned_links},
    maps::{
        MapSource,
        ifaces::IfaceSlots,
        policy::{KernelPolicyMaps, listener_keys},
        stats::Counters,
    },
};

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub interface: String,
    pub mode: String,
    /// The kernel mechanism: `xdp native`, `xdp generic`, `tcx` or `tc-netlink`.
    pub path: String,
    pub program_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub bind: String,
    pub slot: Option<u32>,
    pub open: bool,
    pub exact_entries: usize,
    pub prefix_entries: usize,
    /// `verdict/reason` → packets, summed over interfaces and CPUs.
    pub packets: BTreeMap<String, u64>,
}

/// One counter: packets with one verdict/reason on one interface for one
/// listener (`None`: no listener claimed them).
#[derive(Debug, Serialize)]
pub struct Counter {
    pub interface: String,
    pub listener: Option<String>,
    pub verdict: String,
    pub packets: u64,
}

/// How many counters `status` lists, largest first.
pub const TOP_COUNTERS: usize = 10;

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub links: Vec<LinkStatus>,
    pub listeners: Vec<ListenerStatus>,
    pub listener_entries: (usize, u32),
    pub exact_entries: (usize, u32),
    pub prefix_entries: (usize, u32),
    /// What decides IPv4 sources: `direct` (the direct tables) or `trie`.
    pub ipv4_path: String,
    /// Packets no listener claimed, by reason.
    pub unclaimed: BTreeMap<String, u64>,
    /// The largest counters (at most [`TOP_COUNTERS`]), by interface and
    /// listener: where the traffic and the drops are.
    pub top: Vec<Counter>,
}

/// Interface slot → name, from the pinned ifindex → slot map; slot 0 is
/// "other" (an interface the agent did not assign).
fn interface_names(ifaces: &IfaceSlots) -> anyhow::Result<BTreeMap<u32, String>> {
    let mut names = BTreeMap::from([(0, "other".to_owned())]);
    for (index, slot) in ifaces.assigned()? {
        let name = nix::net::if_::if_indextoname(index).map_or_else(
            |_| format!("ifindex {index}"),
            |n| n.to_string_lossy().into_owned(),
        );
        names.insert(slot, name);
    }
    Ok(names)
}

/// The pinned links: interface and mode from the pin name, program from the link.
fn read_links(dir: &Path) -> anyhow::Result<Vec<LinkStatus>> {
    Ok(pinned_links(dir)?
        .into_iter()
        .map(|l| LinkStatus {
            interface: l.interface,
            mode: l.mode.map_or("unknown", AttachedMode::label).to_owned(),
            path: l.mode.map_or("unknown", AttachedMode::path).to_owned(),
            program_id: l.program_id,
        })
        .collect())
}

/// The first [`TOP_COUNTERS`] cells, named.
fn top_counters(
    cells: Vec<(u32, u32, Stat, u64)>,
    interfaces: &BTreeMap<u32, String>,
    listener_name: impl Fn(u32) -> Option<String>,
) -> Vec<Counter> {
    cells
        .into_iter()
        .take(TOP_COUNTERS)
        .map(|(iface, slot, stat, packets)| Counter {
            interface: interfaces
                .get(&iface)
                .cloned()
                .unwrap_or_else(|| format!("slot {iface}")),
            listener: listener_name(slot),
            verdict: format!("{}/{}", stat.verdict(), stat.reason()),
            packets,
        })
        .collect()
}

/// Read the pinned state under the config's `datapath.pin_path`.
pub fn read(config: &Config) -> anyhow::Result<Status> {
    let dir = pin_dir(&config.datapath.pin_path);
    let links = read_links(&dir)?;
    let mut pins = MapSource::Pinned(&dir);
    let fill = KernelPolicyMaps::open(&mut pins)?.fill()?;
    let counters = Counters::open(&mut pins)?;
    let interfaces = interface_names(&IfaceSlots::open(&mut pins)?)?;
    let every_iface: Vec<u32> = (0..MAX_IFACE_SLOTS).collect();
    let snapshot = counters.snapshot(&every_iface)?;
    let per_slot = snapshot.by_listener();
    // Every non-zero cell, largest first (a stable sort: ties keep the
    // interface, listener, `Stat` order).
    let mut cells: Vec<(u32, u32, Stat, u64)> = snapshot.iter().collect();
    cells.sort_by_key(|c| std::cmp::Reverse(c.3));
    let named = |counts: &[u64; STAT_SLOTS]| -> BTreeMap<String, u64> {
        Stat::ALL
            .iter()
            .filter(|s| counts[**s as usize] > 0)
            .map(|s| {
                (
                    format!("{}/{}", s.verdict(), s.reason()),
                    counts[*s as usize],
                )
            })
            .collect()
    };

    let listeners: Vec<ListenerStatus> = config
        .listeners
        .iter()
        .map(|l| {
            let value = listener_keys(l.bind)
                .iter()
                .find_map(|k| fill.listeners.get(k).copied());
            let slot = value.map(|v| v.policy);
            ListenerStatus {
                name: l.name.clone(),
                bind: l.bind.to_string(),
                slot,
                open: value.is_some_and(|v| v.flags & LISTENER_OPEN != 0),
                exact_entries: slot.and_then(|s| fill.exact.get(&s).copied()).unwrap_or(0),
                prefix_entries: slot
                    .and_then(|s| fill.prefixes.get(&s).copied())
                    .unwrap_or(0),
                packets: slot
                    .and_then(|s| per_slot.get(&s))
                    .map(named)
                    .unwrap_or_default(),
            }
        })
        .collect();
    // The listeners above already know their slots.
    let listener_name = |slot: u32| -> Option<String> {
        (slot != 0).then(|| {
            listeners
                .iter()
                .find(|l: &&ListenerStatus| l.slot == Some(slot))
                .map_or_else(|| format!("slot {slot}"), |l| l.name.clone())
        })
    };
    let top = top_counters(cells, &interfaces, listener_name);
    Ok(Status {
        pin_dir: dir.display().to_string(),
        links,
        listeners,
        listener_entries: (fill.listeners.len(), LISTENERS_CAPACITY),
        exact_entries: (fill.exact.values().sum(), config.datapath.capacity.exact),
        prefix_entries: (
            fill.prefixes.values().sum(),
            config.datapath.capacity.prefixes,
        ),
        ipv4_path: if fill.v4_mode == keyfence_common::policy::V4_MODE_DIRECT {
            "direct".into()
        } else {
            "trie".into()
        },
        unclaimed: per_slot.get(&0).map(named).unwrap_or_default(),
        top,
    })
}

/// The human-readable form.
#[must_use]
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pins: {}", s.pin_dir);
    if s.links.is_empty() {
        let _ = writeln!(out, "attached: nowhere");
    }
    for l in &s.links {
        let prog = l.program_id.map_or_else(|| "?".into(), |p| p.to_string());
        let _ = writeln!(
            out,
            "attached: {} ({}, program {prog}, via {})",
            l.interface, l.mode, l.path
        );
    }
    let fill = |(n, cap): (usize, u32)| format!("{n}/{cap}");
    let _ = writeln!(
        out,
        "maps: listeners {}, exact {}, prefixes {}; IPv4 sources: {}",
        fill(s.listener_entries),
        fill(s.exact_entries),
        fill(s.prefix_entries),
        s.ipv4_path
    );
    let mut rows = vec![[
        "LISTENER".to_string(),
        "BIND".into(),
        "ACCESS".into(),
        "/32+/128".into(),
        "PREFIXES".into(),
        "PACKETS".into(),
    ]];
    for l in &s.listeners {
        let access = match (l.slot, l.open) {
            (None, _) => "not loaded",
            (Some(_), true) => "open",
            (Some(_), false) => "restricted",
        };
        let packets = l
            .packets
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        rows.push([
            l.name.clone(),
            l.bind.clone(),
            access.into(),
            l.exact_entries.to_string(),
            l.prefix_entries.to_string(),
            packets,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let _ = writeln!(out);
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if !s.unclaimed.is_empty() {
        let rest = s
            .unclaimed
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(out, "(no listener)  {rest}");
    }
    if !s.top.is_empty() {
        let _ = writeln!(out, "\ntop counters:");
        let width = s
            .top
            .iter()
            .map(|c| c.packets.to_string().len())
            .max()
            .unwrap_or(0);
        for c in &s.top {
            let listener = c.listener.as_deref().unwrap_or("(no listener)");
            let _ = writeln!(
                out,
                "  {:>width$}  {}  {}  {listener}",
                c.packets, c.verdict, c.interface
            );
        }
    }
    out
}
