//! The direct IPv4 tables (`KF_V4_MODE`, `KF_V4_TOP`, `KF_V4_NODES`,
//! `KF_V4_SETS`, layout in `keyfence_common::policy`) and their writer.
//!
//! The tables are a stride-8 trie of plain arrays over the IPv4 source: the
//! top entry of its /16, a node for its /24 where the /16 is not uniform, a
//! node for its address where the /24 is not, ending at a set id whose bitmap
//! names the listener slots that allow it. The kernel reads them with array
//! lookups the verifier inlines; the exact hash and the trie stay complete
//! for IPv6 and as the fallback (`KF_V4_MODE`).
//!
//! Update guarantee (the policy writer's, see `maps::policy`): every entry
//! is one aligned 32-bit store, so a packet sees each entry before or after
//! it. A sync writes in two passes: the *widening* pass, before the
//! listeners switch, takes every address to the union of what it had and
//! what it will have; the *narrowing* pass, after, takes it to what it will
//! have. A new node is written whole before the entry that points to it, a
//! new set before anything names it; nodes and sets nothing reaches any
//! more are reused only [`QUARANTINE`] later (a program run lasts
//! microseconds). So at every step each address allows at least what both
//! the old and the new policy allow.
//!
//! When the tables cannot hold a policy (more nodes or distinct sets than
//! they have, e.g. a million hosts in as many /24s), the writer switches
//! `KF_V4_MODE` to the trie (one store: the trie is exact at every step of
//! its own ordering) and tries again at the next change.

use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, IterableMap as _, MapData};
use ipnet::IpNet;
use keyfence_common::{
    map_names,
    policy::{
        MAX_LISTENERS, V4_MODE_DIRECT, V4_MODE_TRIE, V4_NODE, V4_NODE_FANOUT, V4_NODES_CAPACITY,
        V4_SETS_CAPACITY, V4_TOP_CAPACITY,
    },
};

use crate::{allowlist::Net, maps::MapSource};

/// How long a node or set nothing reaches waits before it is reused.
pub const QUARANTINE: Duration = Duration::from_secs(1);

/// One 256-entry node.
pub type Node = [u32; V4_NODE_FANOUT];

/// Where the direct tables live: the kernel ([`KernelDirectMaps`]) or memory
/// ([`DirectTables`], in tests).
pub trait DirectBackend {
    /// Before a batch of reads and writes (the kernel maps the arrays).
    fn begin(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// After a batch.
    fn finish(&mut self) {}
    fn mode(&self) -> anyhow::Result<u32>;
    fn set_mode(&mut self, mode: u32) -> anyhow::Result<()>;
    /// Every top entry.
    fn top_all(&self) -> anyhow::Result<Vec<u32>>;
    fn put_top(&mut self, index: u32, value: u32) -> anyhow::Result<()>;
    fn node(&self, id: u32) -> anyhow::Result<Node>;
    fn put_node(&mut self, id: u32, at: usize, value: u32) -> anyhow::Result<()>;
    /// Every set's bitmap.
    fn sets_all(&self) -> anyhow::Result<Vec<u64>>;
    fn put_set(&mut self, id: u32, bits: u64) -> anyhow::Result<()>;
}

/// The direct tables as values: the reference model's and the tests'.
/// Absent nodes and sets are zero, as in the kernel's arrays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectTables {
    pub mode: u32,
    /// Empty: all zero; else [`V4_TOP_CAPACITY`] entries.
    pub top: Vec<u32>,
    pub nodes: std::collections::BTreeMap<u32, Node>,
    pub sets: std::collections::BTreeMap<u32, u64>,
}

impl DirectTables {
    /// The listener slots the tables allow `src` for, as the kernel reads
    /// them; `None` where the kernel would fall back to the trie (not in
    /// direct mode, or an entry that points nowhere usable).
    #[must_use]
    pub fn lookup(&self, src: u32) -> Option<u64> {
        if self.mode != V4_MODE_DIRECT {
            return None;
        }
        let mut v = self.top.get((src >> 16) as usize).copied().unwrap_or(0);
        for shift in [8, 0] {
            if v & V4_NODE == 0 {
                break;
            }
            let id = v & !V4_NODE;
            if id >= V4_NODES_CAPACITY {
                return None;
            }
            v = self
                .nodes
                .get(&id)
                .map_or(0, |n| n[((src >> shift) & 0xff) as usize]);
        }
        if v & V4_NODE != 0 || v >= V4_SETS_CAPACITY {
            return None;
        }
        Some(self.sets.get(&v).copied().unwrap_or(0))
    }
}

impl DirectBackend for DirectTables {
    fn mode(&self) -> anyhow::Result<u32> {
        Ok(self.mode)
    }
    fn set_mode(&mut self, mode: u32) -> anyhow::Result<()> {
        self.mode = mode;
        Ok(())
    }
    fn top_all(&self) -> anyhow::Result<Vec<u32>> {
        Ok(if self.top.is_empty() {
            vec![0; V4_TOP_CAPACITY as usize]
        } else {
            self.top.clone()
        })
    }
    fn put_top(&mut self, index: u32, value: u32) -> anyhow::Result<()> {
        if index >= V4_TOP_CAPACITY {
            bail!("top index {index} out of range");
        }
        if self.top.is_empty() {
            self.top = vec![0; V4_TOP_CAPACITY as usize];
        }
        self.top[index as usize] = value;
        Ok(())
    }
    fn node(&self, id: u32) -> anyhow::Result<Node> {
        Ok(self.nodes.get(&id).copied().unwrap_or([0; V4_NODE_FANOUT]))
    }
    fn put_node(&mut self, id: u32, at: usize, value: u32) -> anyhow::Result<()> {
        if id >= V4_NODES_CAPACITY || at >= V4_NODE_FANOUT {
            bail!("node {id}[{at}] out of range");
        }
        self.nodes.entry(id).or_insert([0; V4_NODE_FANOUT])[at] = value;
        Ok(())
    }
    fn sets_all(&self) -> anyhow::Result<Vec<u64>> {
        let mut out = vec![0; V4_SETS_CAPACITY as usize];
        for (&id, &bits) in &self.sets {
            out[id as usize] = bits;
        }
        Ok(out)
    }
    fn put_set(&mut self, id: u32, bits: u64) -> anyhow::Result<()> {
        if id >= V4_SETS_CAPACITY {
            bail!("set {id} out of range");
        }
        self.sets.insert(id, bits);
        Ok(())
    }
}

/// The IPv4 allow sets of every restricted listener, as a step function
/// over the address space: piece `k` covers `starts[k]..starts[k + 1]`.
pub struct Pieces {
    starts: Vec<u64>,
    bits: Vec<u64>,
    /// The piece the last query ended in (queries come in address order).
    hint: std::cell::Cell<usize>,
}

impl Pieces {
    /// From each restricted slot's networks (IPv6 ones do not count: an
    /// IPv6 prefix never admits an IPv4 source, SPEC §3).
    pub fn of<N: IntoIterator<Item = Net>>(slots: impl IntoIterator<Item = (u32, N)>) -> Self {
        // One event per network end: (position << 8) | start flag << 7 | slot.
        let mut events = Vec::new();
        for (slot, nets) in slots {
            if slot == 0 || slot >= MAX_LISTENERS {
                continue;
            }
            for net in nets {
                if let IpNet::V4(v4) = *net {
                    let start = u64::from(u32::from(v4.network()));
                    let end = u64::from(u32::from(v4.broadcast())) + 1;
                    events.push((start << 8) | (1 << 7) | u64::from(slot));
                    events.push((end << 8) | u64::from(slot));
                }
            }
        }
        events.sort_unstable();
        let mut counts = [0_u32; 64];
        let mut bits = 0_u64;
        let mut out = Self {
            starts: vec![0],
            bits: vec![0],
            hint: std::cell::Cell::new(0),
        };
        let mut i = 0;
        while i < events.len() {
            let at = events[i] >> 8;
            while i < events.len() && events[i] >> 8 == at {
                let slot = (events[i] & 0x3f) as usize;
                if events[i] & (1 << 7) != 0 {
                    counts[slot] += 1;
                    bits |= 1 << slot;
                } else {
                    counts[slot] -= 1;
                    if counts[slot] == 0 {
                        bits &= !(1 << slot);
                    }
                }
                i += 1;
            }
            let last = out.bits.len() - 1;
            if out.bits[last] == bits {
                continue;
            }
            if out.starts[last] == at {
                out.bits[last] = bits;
            } else {
                out.starts.push(at);
                out.bits.push(bits);
            }
        }
        out
    }

    /// The bitmap over `lo..lo + len` if one piece covers it all.
    fn uniform(&self, lo: u64, len: u64) -> Option<u64> {
        let mut k = self.hint.get();
        if k >= self.starts.len() || self.starts[k] > lo {
            k = self.starts.partition_point(|&s| s <= lo) - 1;
        }
        while k + 1 < self.starts.len() && self.starts[k + 1] <= lo {
            k += 1;
        }
        self.hint.set(k);
        let end = self.starts.get(k + 1).copied().unwrap_or(1 << 32);
        (end >= lo + len).then_some(self.bits[k])
    }
}

/// The tables ran out of nodes or sets: IPv4 takes the trie.
#[derive(Debug)]
struct Full(&'static str);

/// What one sync works with, from its widening pass to its narrowing one.
struct Batch {
    top: Vec<u32>,
    /// Set id → bitmap, as in the kernel.
    sets: Vec<u64>,
    /// Bitmap → the set id that holds it.
    ids: HashMap<u64, u32>,
    free_nodes: Vec<u32>,
    free_sets: Vec<u32>,
    /// Nodes and sets reachable at the start or written since: what may
    /// need quarantine once the narrowing pass is done.
    touched_nodes: Vec<u32>,
    touched_sets: Vec<u32>,
    /// A pass ran out of room: the rest of the sync is skipped.
    full: bool,
    /// The top entries this sync visits; `None`: all of them.
    only: Option<Vec<u32>>,
}

/// What the writer knows of the tables after a sync that ran to its end, so
/// that the next one need not read them back and scan all 65,536 top
/// entries: it visits only the /16s its change touches.
struct Known {
    top: Vec<u32>,
    sets: Vec<u64>,
    /// Bitmap → set id for every set handed out and not reclaimed. A set
    /// that a visiting sync stops reaching stays here, holding its bits, and
    /// may be named again; it is reclaimed (quarantined) by the next sync
    /// that visits everything.
    ids: HashMap<u64, u32>,
    free_nodes: Vec<u32>,
    free_sets: Vec<u32>,
    /// The tables decide exactly the last sync's target (direct mode,
    /// nothing skipped): what a change does not touch is already right.
    exact: bool,
}

/// A visiting sync needs at least this many free sets (its new sets are not
/// reclaimed until a full one); below it the sync visits everything.
const VISIT_MIN_FREE_SETS: usize = 4096;

/// Which structure decides IPv4 sources, for `keyfence status` and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4Path {
    Direct,
    /// The trie, and why.
    Trie(&'static str),
}

/// The writer of the direct tables; the policy writer drives it.
pub struct DirectWriter {
    /// Released nodes and sets, and when.
    quarantine_nodes: Vec<(Instant, u32)>,
    quarantine_sets: Vec<(Instant, u32)>,
    /// When `KF_V4_MODE` last went to the trie: until [`QUARANTINE`] later a
    /// packet may still be reading the tables.
    left_direct: Option<Instant>,
    batch: Option<Batch>,
    known: Option<Known>,
    path: V4Path,
}

impl Default for DirectWriter {
    fn default() -> Self {
        Self {
            quarantine_nodes: Vec::new(),
            quarantine_sets: Vec::new(),
            left_direct: None,
            batch: None,
            known: None,
            path: V4Path::Trie("not written yet"),
        }
    }
}

/// Entries of the nodes and sets reachable from `top`: (node ids, set ids).
fn reachable(
    node: impl Fn(u32) -> anyhow::Result<Node>,
    top: &[u32],
) -> anyhow::Result<(Vec<bool>, Vec<bool>)> {
    let mut nodes = vec![false; V4_NODES_CAPACITY as usize];
    let mut sets = vec![false; V4_SETS_CAPACITY as usize];
    let mark = |v: u32, sets: &mut Vec<bool>| {
        if v & V4_NODE == 0 && v < V4_SETS_CAPACITY {
            sets[v as usize] = true;
        }
    };
    for &v in top {
        if v & V4_NODE == 0 {
            mark(v, &mut sets);
            continue;
        }
        let id = v & !V4_NODE;
        if id >= V4_NODES_CAPACITY || nodes[id as usize] {
            continue;
        }
        nodes[id as usize] = true;
        for w in node(id)? {
            if w & V4_NODE == 0 {
                mark(w, &mut sets);
                continue;
            }
            let leaf = w & !V4_NODE;
            if leaf >= V4_NODES_CAPACITY || nodes[leaf as usize] {
                continue;
            }
            nodes[leaf as usize] = true;
            for x in node(leaf)? {
                mark(x, &mut sets);
            }
        }
    }
    Ok((nodes, sets))
}

/// The nodes reached from the top entries `indices` (a node has one parent,
/// so no other entry reaches them).
fn nodes_under(
    node: impl Fn(u32) -> anyhow::Result<Node>,
    top: &[u32],
    indices: &[u32],
) -> anyhow::Result<Vec<u32>> {
    let is_node = |v: u32| v & V4_NODE != 0 && (v & !V4_NODE) < V4_NODES_CAPACITY;
    let mut out = Vec::new();
    for &i in indices {
        let v = top[i as usize];
        if !is_node(v) {
            continue;
        }
        let id = v & !V4_NODE;
        out.push(id);
        out.extend(
            node(id)?
                .into_iter()
                .filter(|&w| is_node(w))
                .map(|w| w & !V4_NODE),
        );
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl DirectWriter {
    /// Which structure decides IPv4 sources after the last sync.
    #[must_use]
    pub fn path(&self) -> V4Path {
        self.path
    }

    /// Start a sync: read the tables, then run the widening pass towards
    /// `want` (a no-op write-wise in trie mode once no packet can be reading
    /// the tables). Errors are the backend's; running out of room is not an
    /// error (IPv4 goes to the trie, see the module doc).
    ///
    /// `touched`: the top entries whose /16 the change reaches (sorted), or
    /// `None` when it may reach anywhere. Where the last sync left the
    /// tables exact, only those are visited.
    pub fn widen(
        &mut self,
        be: &mut dyn DirectBackend,
        want: &Pieces,
        touched: Option<&[u32]>,
    ) -> anyhow::Result<()> {
        self.batch = None;
        be.begin()?;
        let now = Instant::now();
        let expired = |q: &mut Vec<(Instant, u32)>| {
            let mut out = Vec::new();
            q.retain(|&(at, id)| {
                let keep = now.duration_since(at) < QUARANTINE;
                if !keep {
                    out.push(id);
                }
                keep
            });
            out
        };
        let expired_nodes = expired(&mut self.quarantine_nodes);
        let expired_sets = expired(&mut self.quarantine_sets);
        let known = self.known.take();
        let batch = match (known, touched) {
            (Some(k), Some(only))
                if k.exact
                    && self.path == V4Path::Direct
                    && k.free_sets.len() + expired_sets.len() >= VISIT_MIN_FREE_SETS =>
            {
                let touched_nodes = nodes_under(|id| be.node(id), &k.top, only)?;
                let mut free_nodes = k.free_nodes;
                free_nodes.extend(expired_nodes);
                let mut free_sets = k.free_sets;
                free_sets.extend(expired_sets);
                Batch {
                    top: k.top,
                    sets: k.sets,
                    ids: k.ids,
                    free_nodes,
                    free_sets,
                    touched_nodes,
                    touched_sets: Vec::new(),
                    full: false,
                    only: Some(only.to_vec()),
                }
            }
            (known, _) => self.read_batch(be, now, known.as_ref())?,
        };
        let mut batch = batch;
        let mode = be.mode()?;
        let reading = mode == V4_MODE_DIRECT
            || self
                .left_direct
                .is_some_and(|at| now.duration_since(at) < QUARANTINE);
        if reading && let Err(full) = pass(be, &mut batch, want, true)? {
            self.fall_back(be, &mut batch, full.0)?;
        }
        self.batch = Some(batch);
        Ok(())
    }

    /// A sync that visits everything: the tables read back, what is free
    /// found by walking them. Sets a visiting sync stopped reaching (still
    /// in `known`) are quarantined from now: a packet may have read the
    /// entry that named one a moment ago.
    fn read_batch(
        &mut self,
        be: &mut dyn DirectBackend,
        now: Instant,
        known: Option<&Known>,
    ) -> anyhow::Result<Batch> {
        let top = be.top_all()?;
        let sets = be.sets_all()?;
        let (live_nodes, live_sets) = reachable(|id| be.node(id), &top)?;
        if let Some(k) = known {
            for &id in k.ids.values() {
                if id != 0 && !live_sets[id as usize] {
                    self.quarantine_sets.push((now, id));
                }
            }
        }
        let mut ids = HashMap::new();
        ids.insert(0, 0);
        for (id, &live) in live_sets.iter().enumerate() {
            if live && id != 0 {
                ids.entry(sets[id]).or_insert(u32::try_from(id)?);
            }
        }
        // Ids nothing reaches that are not in quarantine, and the live ones.
        let ids_of = |live: &[bool], quarantined: &[(Instant, u32)], want_live: bool| {
            let mut pick: Vec<bool> = live.iter().map(|&l| l == want_live).collect();
            for &(_, id) in quarantined {
                if let Some(p) = pick.get_mut(id as usize) {
                    *p = false;
                }
            }
            pick.iter()
                .enumerate()
                .filter(|(_, p)| **p)
                .map(|(id, _)| id as u32)
                .collect::<Vec<u32>>()
        };
        let mut free_nodes = ids_of(&live_nodes, &self.quarantine_nodes, false);
        let mut free_sets = ids_of(&live_sets, &self.quarantine_sets, false);
        free_sets.retain(|&id| id != 0);
        // Popped from the end: lowest ids first.
        free_nodes.reverse();
        free_sets.reverse();
        Ok(Batch {
            top,
            sets,
            ids,
            free_nodes,
            free_sets,
            touched_nodes: ids_of(&live_nodes, &[], true),
            touched_sets: ids_of(&live_sets, &[], true),
            full: false,
            only: None,
        })
    }

    /// Finish the sync [`Self::widen`] started: the narrowing pass, then
    /// direct mode if the tables hold the policy, quarantine for what
    /// nothing reaches any more.
    pub fn narrow(&mut self, be: &mut dyn DirectBackend, want: &Pieces) -> anyhow::Result<()> {
        let Some(mut batch) = self.batch.take() else {
            return Ok(());
        };
        let result = self.narrow_batch(be, &mut batch, want);
        be.finish();
        if result.is_ok() {
            self.known = Some(Known {
                exact: !batch.full && self.path == V4Path::Direct,
                top: batch.top,
                sets: batch.sets,
                ids: batch.ids,
                free_nodes: batch.free_nodes,
                free_sets: batch.free_sets,
            });
        }
        result
    }

    fn narrow_batch(
        &mut self,
        be: &mut dyn DirectBackend,
        batch: &mut Batch,
        want: &Pieces,
    ) -> anyhow::Result<()> {
        if !batch.full {
            match pass(be, batch, want, false)? {
                Ok(()) => {
                    if be.mode()? != V4_MODE_DIRECT {
                        be.set_mode(V4_MODE_DIRECT)?;
                    }
                    self.path = V4Path::Direct;
                }
                Err(full) => self.fall_back(be, batch, full.0)?,
            }
        }
        let now = Instant::now();
        if let Some(only) = &batch.only {
            // A node has one parent: only the visited entries' nodes can
            // have left the tree. Sets stay held (see `Known::ids`).
            let live = nodes_under(|id| be.node(id), &batch.top, only)?;
            for &id in &batch.touched_nodes {
                if live.binary_search(&id).is_err() {
                    self.quarantine_nodes.push((now, id));
                }
            }
        } else {
            let (live_nodes, live_sets) = reachable(|id| be.node(id), &batch.top)?;
            for &id in &batch.touched_nodes {
                if !live_nodes[id as usize] {
                    self.quarantine_nodes.push((now, id));
                }
            }
            for &id in &batch.touched_sets {
                if !live_sets[id as usize] && id != 0 {
                    self.quarantine_sets.push((now, id));
                    batch.ids.retain(|_, v| *v != id);
                }
            }
        }
        self.quarantine_nodes.sort_unstable();
        self.quarantine_nodes.dedup_by_key(|q| q.1);
        self.quarantine_sets.sort_unstable();
        self.quarantine_sets.dedup_by_key(|q| q.1);
        Ok(())
    }

    /// Out of room: IPv4 takes the trie from now on (one store).
    fn fall_back(
        &mut self,
        be: &mut dyn DirectBackend,
        batch: &mut Batch,
        why: &'static str,
    ) -> anyhow::Result<()> {
        batch.full = true;
        if be.mode()? != V4_MODE_TRIE {
            be.set_mode(V4_MODE_TRIE)?;
            self.left_direct = Some(Instant::now());
            tracing::warn!(
                reason = why,
                "the direct IPv4 tables cannot hold this policy: IPv4 sources take the trie"
            );
        }
        self.path = V4Path::Trie(why);
        Ok(())
    }

    /// IPv4 takes the trie, whatever the tables hold (`why` for the logs).
    pub fn give_up(&mut self, be: &mut dyn DirectBackend, why: &'static str) -> anyhow::Result<()> {
        self.batch = None;
        self.known = None;
        if be.mode()? != V4_MODE_TRIE {
            be.set_mode(V4_MODE_TRIE)?;
            self.left_direct = Some(Instant::now());
        }
        self.path = V4Path::Trie(why);
        Ok(())
    }

    /// After a failed write: IPv4 takes the trie, the structure the policy
    /// writer reads back and reasons about (`open_uncovered`), until the
    /// next apply writes the tables again.
    pub fn abort(&mut self, be: &mut dyn DirectBackend) {
        let batch = self.batch.take();
        if let Err(e) = self.give_up(be, "a write failed") {
            tracing::warn!(error = %format!("{e:#}"), "switching IPv4 to the trie after a failed write");
        }
        if batch.is_some() {
            be.finish();
        }
    }
}

/// One pass over the table (the batch's visited entries, or all of them):
/// widening (every address to old ∪ new) or narrowing (to new).
/// `Ok(Err(Full))`: out of room, written so far stays.
fn pass(
    be: &mut dyn DirectBackend,
    batch: &mut Batch,
    want: &Pieces,
    widen: bool,
) -> anyhow::Result<Result<(), Full>> {
    let only = batch.only.take();
    let result = match &only {
        Some(only) => pass_over(be, batch, want, widen, only.iter().copied()),
        None => pass_over(be, batch, want, widen, 0..V4_TOP_CAPACITY),
    };
    batch.only = only;
    result
}

/// [`pass`] over the top entries `indices` (in order).
fn pass_over(
    be: &mut dyn DirectBackend,
    batch: &mut Batch,
    want: &Pieces,
    widen: bool,
    indices: impl Iterator<Item = u32>,
) -> anyhow::Result<Result<(), Full>> {
    // (cur, widen, want bits) → the entry last computed for them: most of
    // the table is long runs of one set under one piece.
    let mut last: Option<(u32, u64, u32)> = None;
    for i in indices {
        let cur = batch.top[i as usize];
        if cur & V4_NODE == 0
            && let Some(w) = want.uniform(u64::from(i) << 16, 1 << 16)
        {
            let new = match last {
                Some((c, bits, new)) if c == cur && bits == w => new,
                _ => {
                    let Ok(new) = place(be, batch, want, cur, u64::from(i) << 16, 16, widen)?
                    else {
                        return Ok(Err(Full("out of listener sets")));
                    };
                    last = Some((cur, w, new));
                    new
                }
            };
            if new != cur {
                be.put_top(i, new)?;
                batch.top[i as usize] = new;
            }
            continue;
        }
        let new = match place(be, batch, want, cur, u64::from(i) << 16, 16, widen)? {
            Ok(v) => v,
            Err(full) => return Ok(Err(full)),
        };
        if new != cur {
            be.put_top(i, new)?;
            batch.top[i as usize] = new;
        }
    }
    Ok(Ok(()))
}

/// The entry for the `2^span` addresses from `lo`, which holds `cur` now:
/// the same entry (a node is updated in place), or a new one to store.
fn place(
    be: &mut dyn DirectBackend,
    batch: &mut Batch,
    want: &Pieces,
    cur: u32,
    lo: u64,
    span: u32,
    widen: bool,
) -> anyhow::Result<Result<u32, Full>> {
    let uniform = want.uniform(lo, 1 << span);
    let is_node = cur & V4_NODE != 0 && (cur & !V4_NODE) < V4_NODES_CAPACITY && span > 0;
    let cur_bits = |batch: &Batch| {
        if cur & V4_NODE == 0 && cur < V4_SETS_CAPACITY {
            batch.sets[cur as usize]
        } else {
            0
        }
    };
    match (is_node, uniform) {
        (false, Some(w)) => {
            let bits = if widen { w | cur_bits(batch) } else { w };
            set_id(be, batch, bits)
        }
        (true, Some(w)) if !widen => set_id(be, batch, w),
        (true, _) => {
            let id = cur & !V4_NODE;
            let node = be.node(id)?;
            for (k, &child) in node.iter().enumerate() {
                let at = lo + ((k as u64) << (span - 8));
                let new = match place(be, batch, want, child, at, span - 8, widen)? {
                    Ok(v) => v,
                    Err(full) => return Ok(Err(full)),
                };
                if new != child {
                    be.put_node(id, k, new)?;
                }
            }
            Ok(Ok(cur))
        }
        (false, None) => {
            // A new node, written whole before anything points to it; each
            // child starts from what `cur` gave the whole range.
            let Some(id) = batch.free_nodes.pop() else {
                return Ok(Err(Full("out of nodes")));
            };
            batch.touched_nodes.push(id);
            let base = if cur & V4_NODE == 0 { cur } else { 0 };
            for k in 0..V4_NODE_FANOUT {
                let at = lo + ((k as u64) << (span - 8));
                let new = match place(be, batch, want, base, at, span - 8, widen)? {
                    Ok(v) => v,
                    Err(full) => return Ok(Err(full)),
                };
                be.put_node(id, k, new)?;
            }
            Ok(Ok(V4_NODE | id))
        }
    }
}

/// The id of the set holding `bits`, written first if it is new.
fn set_id(
    be: &mut dyn DirectBackend,
    batch: &mut Batch,
    bits: u64,
) -> anyhow::Result<Result<u32, Full>> {
    if let Some(&id) = batch.ids.get(&bits) {
        return Ok(Ok(id));
    }
    let Some(id) = batch.free_sets.pop() else {
        return Ok(Err(Full("out of listener sets")));
    };
    be.put_set(id, bits)?;
    batch.sets[id as usize] = bits;
    batch.ids.insert(bits, id);
    batch.touched_sets.push(id);
    Ok(Ok(id))
}

/// The direct tables in the kernel, written through shared mappings with
/// single aligned atomic stores. `KF_V4_TOP` and `KF_V4_SETS` (1 MiB
/// together; every sync reads them whole) stay mapped from the first sync
/// on. `KF_V4_NODES` (16 MiB) is mapped only while a sync runs, and only
/// the pages of the nodes it reaches, or whole once it reaches many: a
/// kernel array mapping maps every page at `mmap` time, so mapping all of it
/// for a one-address change cost more than the change, and its pages would
/// count in the agent's RSS.
pub struct KernelDirectMaps {
    mode: Array<MapData, u32>,
    top: Array<MapData, u32>,
    nodes: Array<MapData, keyfence_common::policy::V4Node>,
    sets: Array<MapData, u64>,
    small: Option<Small>,
    /// The node pages mapped by the running sync.
    node_pages: std::cell::RefCell<NodePages>,
    syncing: bool,
}

/// `KF_V4_TOP` and `KF_V4_SETS`, mapped.
struct Small {
    top: Mapping,
    sets: Mapping,
}

/// What of `KF_V4_NODES` is mapped.
enum NodePages {
    /// Page index → a one-page mapping.
    Pages(HashMap<usize, Mapping>),
    Whole(Mapping),
}

/// Node pages a sync maps one by one before it maps the whole array.
const NODE_PAGES_ONE_BY_ONE: usize = 32;

struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// `len` bytes of the array behind `fd` from byte `offset` (a multiple
    /// of the page size).
    fn new(fd: i32, offset: usize, len: usize, name: &str) -> anyhow::Result<Self> {
        let offset = libc::off_t::try_from(offset).context("mapping offset")?;
        // SAFETY: a fresh shared mapping of a BPF array map's fd; the kernel
        // checks offset and length against the map and its mmapable flag.
        #[expect(unsafe_code, reason = "mmap of a BPF_F_MMAPABLE array")]
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("mapping {name}"));
        }
        Ok(Self { ptr, len })
    }

    /// The mapping as 32-bit words.
    fn words(&self) -> &[std::sync::atomic::AtomicU32] {
        // SAFETY: the mapping is `len` bytes, page aligned, alive as long as
        // `self`; the kernel side only reads these words.
        #[expect(unsafe_code, reason = "an atomic view of mapped map memory")]
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.cast::<std::sync::atomic::AtomicU32>(),
                self.len / 4,
            )
        }
    }

    /// The mapping as 64-bit words.
    fn dwords(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: as in `words`; page aligned, so 8-byte aligned.
        #[expect(unsafe_code, reason = "an atomic view of mapped map memory")]
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.cast::<std::sync::atomic::AtomicU64>(),
                self.len / 8,
            )
        }
    }

    fn u32_at(&self, offset: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(offset.is_multiple_of(4), "offset aligned");
        &self.words()[offset / 4]
    }

    fn u64_at(&self, offset: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(offset.is_multiple_of(8), "offset aligned");
        &self.dwords()[offset / 8]
    }
}

// SAFETY: the mapping is plain shared memory owned by this value; the
// writer that holds it is used from one thread at a time.
#[expect(unsafe_code, reason = "a raw pointer to mapped memory")]
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once.
        #[expect(unsafe_code, reason = "munmap")]
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Array map elements are 8-byte aligned: a `u32` entry takes 8 bytes.
const TOP_STRIDE: usize = 8;
const NODE_STRIDE: usize = 4 * V4_NODE_FANOUT;
const SET_STRIDE: usize = 8;
const PAGE: usize = 4096;
/// Pages of `KF_V4_NODES`.
const NODES_PAGES: usize = (V4_NODES_CAPACITY as usize * NODE_STRIDE).div_ceil(PAGE);

fn page_round(len: usize) -> usize {
    len.div_ceil(PAGE) * PAGE
}

impl KernelDirectMaps {
    pub fn open(maps: &mut MapSource<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            mode: maps.map(map_names::V4_MODE)?,
            top: maps.map(map_names::V4_TOP)?,
            nodes: maps.map(map_names::V4_NODES)?,
            sets: maps.map(map_names::V4_SETS)?,
            small: None,
            node_pages: std::cell::RefCell::new(NodePages::Pages(HashMap::new())),
            syncing: false,
        })
    }

    fn map_small(&self) -> anyhow::Result<Small> {
        Ok(Small {
            top: Mapping::new(
                self.top.map().fd().as_fd_raw(),
                0,
                page_round(V4_TOP_CAPACITY as usize * TOP_STRIDE),
                map_names::V4_TOP,
            )?,
            sets: Mapping::new(
                self.sets.map().fd().as_fd_raw(),
                0,
                page_round(V4_SETS_CAPACITY as usize * SET_STRIDE),
                map_names::V4_SETS,
            )?,
        })
    }

    fn map_nodes(&self, page: usize, pages: usize) -> anyhow::Result<Mapping> {
        Mapping::new(
            self.nodes.map().fd().as_fd_raw(),
            page * PAGE,
            pages * PAGE,
            map_names::V4_NODES,
        )
    }

    fn small(&self) -> anyhow::Result<&Small> {
        match &self.small {
            Some(small) if self.syncing => Ok(small),
            _ => bail!("the direct tables are not mapped (no sync running)"),
        }
    }

    /// Run `f` on the 256 words of node `id`, mapping its page first (or
    /// the whole array, once a sync has mapped many pages).
    fn node_words<T>(
        &self,
        id: u32,
        f: impl FnOnce(&[std::sync::atomic::AtomicU32]) -> T,
    ) -> anyhow::Result<T> {
        if !self.syncing {
            bail!("the direct tables are not mapped (no sync running)");
        }
        if id >= V4_NODES_CAPACITY {
            bail!("node {id} out of range");
        }
        let offset = id as usize * NODE_STRIDE;
        let page = offset / PAGE;
        let mut pages = self.node_pages.borrow_mut();
        if let NodePages::Pages(one_by_one) = &*pages
            && !one_by_one.contains_key(&page)
            && one_by_one.len() >= NODE_PAGES_ONE_BY_ONE
        {
            *pages = NodePages::Whole(self.map_nodes(0, NODES_PAGES)?);
        }
        let (m, at) = match &mut *pages {
            NodePages::Whole(m) => (&*m, offset),
            NodePages::Pages(one_by_one) => {
                let m = match one_by_one.entry(page) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(self.map_nodes(page, 1)?)
                    }
                };
                (&*m, offset % PAGE)
            }
        };
        Ok(f(&m.words()[at / 4..at / 4 + V4_NODE_FANOUT]))
    }

    /// Everything the tables hold that a packet can reach (the reference
    /// model's input; reads through mappings of its own).
    pub fn read(&self) -> anyhow::Result<DirectTables> {
        let small = self.map_small()?;
        let nodes = self.map_nodes(0, NODES_PAGES)?;
        let node = |id: u32| -> anyhow::Result<Node> {
            if id >= V4_NODES_CAPACITY {
                bail!("node {id} out of range");
            }
            Ok(read_node(nodes.words(), id as usize * NODE_STRIDE / 4))
        };
        let mut tables = DirectTables {
            mode: self.mode()?,
            top: top_words(&small.top),
            ..DirectTables::default()
        };
        let (live_nodes, live_sets) = reachable(node, &tables.top)?;
        for (id, _) in live_nodes.iter().enumerate().filter(|(_, l)| **l) {
            let id = u32::try_from(id)?;
            tables.nodes.insert(id, node(id)?);
        }
        let all = set_words(&small.sets);
        for (id, _) in live_sets.iter().enumerate().filter(|(_, l)| **l) {
            tables.sets.insert(u32::try_from(id)?, all[id]);
        }
        Ok(tables)
    }
}

/// Every top entry (a `u32` in each 8-byte element).
fn top_words(top: &Mapping) -> Vec<u32> {
    top.words()
        .iter()
        .step_by(TOP_STRIDE / 4)
        .take(V4_TOP_CAPACITY as usize)
        .map(|w| w.load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}

/// Every set's bitmap.
fn set_words(sets: &Mapping) -> Vec<u64> {
    sets.dwords()
        .iter()
        .take(V4_SETS_CAPACITY as usize)
        .map(|w| w.load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}

/// The node whose first entry is word `base` of `words`.
fn read_node(words: &[std::sync::atomic::AtomicU32], base: usize) -> Node {
    std::array::from_fn(|k| words[base + k].load(std::sync::atomic::Ordering::Relaxed))
}

impl DirectBackend for KernelDirectMaps {
    fn begin(&mut self) -> anyhow::Result<()> {
        if self.small.is_none() {
            self.small = Some(self.map_small()?);
        }
        self.syncing = true;
        Ok(())
    }
    fn finish(&mut self) {
        self.syncing = false;
        *self.node_pages.get_mut() = NodePages::Pages(HashMap::new());
    }
    fn mode(&self) -> anyhow::Result<u32> {
        self.mode.get(&0, 0).context("reading KF_V4_MODE")
    }
    fn set_mode(&mut self, mode: u32) -> anyhow::Result<()> {
        self.mode.set(0, mode, 0).context("writing KF_V4_MODE")
    }
    fn top_all(&self) -> anyhow::Result<Vec<u32>> {
        Ok(top_words(&self.small()?.top))
    }
    fn put_top(&mut self, index: u32, value: u32) -> anyhow::Result<()> {
        if index >= V4_TOP_CAPACITY {
            bail!("top index {index} out of range");
        }
        self.small()?
            .top
            .u32_at(index as usize * TOP_STRIDE)
            .store(value, std::sync::atomic::Ordering::Release);
        Ok(())
    }
    fn node(&self, id: u32) -> anyhow::Result<Node> {
        self.node_words(id, |words| read_node(words, 0))
    }
    fn put_node(&mut self, id: u32, at: usize, value: u32) -> anyhow::Result<()> {
        if at >= V4_NODE_FANOUT {
            bail!("node {id}[{at}] out of range");
        }
        self.node_words(id, |words| {
            words[at].store(value, std::sync::atomic::Ordering::Release);
        })
    }
    fn sets_all(&self) -> anyhow::Result<Vec<u64>> {
        Ok(set_words(&self.small()?.sets))
    }
    fn put_set(&mut self, id: u32, bits: u64) -> anyhow::Result<()> {
        if id >= V4_SETS_CAPACITY {
            bail!("set {id} out of range");
        }
        self.small()?
            .sets
            .u64_at(id as usize * SET_STRIDE)
            .store(bits, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// A raw fd for `mmap`.
trait RawFd {
    fn as_fd_raw(&self) -> i32;
}

impl RawFd for aya::maps::MapFd {
    fn as_fd_raw(&self) -> i32 {
        use std::os::fd::AsFd as _;
        self.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The memory tables, counting the syncs that read them back whole.
    #[derive(Default)]
    struct Counted {
        tables: DirectTables,
        whole_reads: std::cell::Cell<usize>,
    }

    impl DirectBackend for Counted {
        fn mode(&self) -> anyhow::Result<u32> {
            self.tables.mode()
        }
        fn set_mode(&mut self, mode: u32) -> anyhow::Result<()> {
            self.tables.set_mode(mode)
        }
        fn top_all(&self) -> anyhow::Result<Vec<u32>> {
            self.whole_reads.set(self.whole_reads.get() + 1);
            self.tables.top_all()
        }
        fn put_top(&mut self, index: u32, value: u32) -> anyhow::Result<()> {
            self.tables.put_top(index, value)
        }
        fn node(&self, id: u32) -> anyhow::Result<Node> {
            self.tables.node(id)
        }
        fn put_node(&mut self, id: u32, at: usize, value: u32) -> anyhow::Result<()> {
            self.tables.put_node(id, at, value)
        }
        fn sets_all(&self) -> anyhow::Result<Vec<u64>> {
            self.tables.sets_all()
        }
        fn put_set(&mut self, id: u32, bits: u64) -> anyhow::Result<()> {
            self.tables.put_set(id, bits)
        }
    }

    fn nets(list: &[&str]) -> Vec<Net> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn v4(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    /// Sync `be` to slot 1 allowing `list` and slot 2 `203.0.113.0/24` (or
    /// nothing), visiting `touched` (or all).
    fn sync(w: &mut DirectWriter, be: &mut Counted, list: &[&str], touched: Option<&[u32]>) {
        let second = if list.contains(&"203.0.113.9/32") {
            nets(&["203.0.113.0/24"])
        } else {
            Vec::new()
        };
        let want = Pieces::of([(1, nets(list)), (2, second)]);
        w.widen(be, &want, touched).unwrap();
        w.narrow(be, &want).unwrap();
        assert_eq!(w.path(), V4Path::Direct);
        for probe in [
            "192.0.2.1",
            "192.0.2.130",
            "192.0.2.200",
            "198.51.100.7",
            "198.51.100.8",
            "203.0.113.9",
            "203.0.113.200",
            "10.0.0.1",
        ] {
            let src = v4(probe);
            let want_bits = want.uniform(u64::from(src), 1).unwrap();
            assert_eq!(
                be.tables.lookup(src),
                Some(want_bits),
                "{probe} after syncing to {list:?}"
            );
        }
    }

    #[test]
    fn a_change_visits_only_its_16s_and_a_full_sync_reclaims_what_they_left() {
        let mut w = DirectWriter::default();
        let mut be = Counted::default();
        let base = ["192.0.2.0/25", "192.0.2.200/32", "198.51.100.7/32"];
        sync(&mut w, &mut be, &base, None);
        assert!(w.known.as_ref().is_some_and(|k| k.exact));
        // Visiting syncs: a host in a /16 of its own, then a /25 beside it
        // (a node, then none), and back. Nothing is read back whole.
        let t = [v4("203.0.113.0") >> 16];
        let with_host = [base.as_slice(), &["203.0.113.9/32"]].concat();
        let with_net = [base.as_slice(), &["203.0.113.128/25", "203.0.113.9/32"]].concat();
        for _ in 0..3 {
            sync(&mut w, &mut be, &with_host, Some(&t));
            sync(&mut w, &mut be, &with_net, Some(&t));
            sync(&mut w, &mut be, &base, Some(&t));
        }
        assert_eq!(
            be.whole_reads.get(),
            1,
            "only the first sync read the tables"
        );
        // The nodes the /16 dropped are quarantined as they go; no set is.
        assert!(!w.quarantine_nodes.is_empty());
        assert!(w.quarantine_sets.is_empty());
        let held = w.known.as_ref().unwrap().ids.len();
        // A full sync reclaims the sets nothing reaches any more.
        sync(&mut w, &mut be, &base, None);
        assert_eq!(be.whole_reads.get(), 2);
        assert!(!w.quarantine_sets.is_empty(), "{held} sets were held");
        let reached: Vec<u32> = w.known.as_ref().unwrap().ids.values().copied().collect();
        for (_, id) in &w.quarantine_sets {
            assert!(
                !reached.contains(id),
                "set {id} is both held and quarantined"
            );
        }
        // After a failed sync nothing is known: the next one reads back.
        w.give_up(&mut be, "test").unwrap();
        assert!(w.known.is_none());
    }
}
