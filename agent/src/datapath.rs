//! The loader: every kernel-dependent choice lives here. It loads the embedded
//! object, pins and adopts maps under `<pin_path>/v<LAYOUT_VERSION>/`, checks the
//! layout of maps it adopts, holds a lock so two agents cannot race, walks the
//! attach ladder, and pins links so enforcement outlives the agent.
//!
//! Restart semantics: maps and links are pinned, so when the agent exits the
//! kernel keeps enforcing the last applied policy. The next start adopts the maps
//! (contents intact), loads the new program, and swaps it into each pinned link
//! with `BPF_LINK_UPDATE` (atomic: no packet sees no program).

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapInfo, MapType, RingBuf},
    programs::{
        LinkOrder, ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
};
use keyfence_common::{
    LAYOUT_VERSION, map_names,
    policy::{
        LISTENERS_CAPACITY, ListenerKey, ListenerValue, PORTS_CAPACITY, PolicyAddr,
        V4_NODES_CAPACITY, V4_SETS_CAPACITY, V4_TOP_CAPACITY,
    },
    program_names,
    sample::{DROP_SAMPLES_BYTES, DropSample},
    stats::{IFINDEX_SLOTS_CAPACITY, STATS_CAPACITY, StatBlock},
    unparsed::{UNPARSED_CAPACITY, UnparsedKey},
};

use crate::{
    config::{AttachMode, MapCapacity, TcAttach, Unparsed},
    maps::{
        MapSource,
        ifaces::IfaceSlots,
        policy::{ApplyReport, KernelPolicyMaps, PolicyBackend, PolicyTables, PolicyWriter},
        stats::{CounterSnapshot, Counters},
        unparsed::{self, KernelUnparsed, UnparsedWriter},
    },
    policy::CompiledPolicy,
    tc_netlink,
};

/// The eBPF object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keyfence-ebpf"));

/// The bench object built by `build.rs` under the `bench` feature: the
/// reference programs and map of `keyfence_common::bench`, loaded on their own
/// by the bench, never pinned or attached.
#[cfg(feature = "bench")]
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keyfence-bench-ebpf"));

/// How a program ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachedMode {
    Native,
    Generic,
    /// TC through a TCX link (kernels >= 6.6).
    Tc,
    /// TC through a clsact qdisc and a netlink filter (`tc_netlink`).
    TcNetlink,
}

impl AttachedMode {
    /// The `mode` label of `keyfence_datapath_attached`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Tc | AttachedMode::TcNetlink => "tc",
        }
    }

    /// The kernel mechanism (`keyfence status`, the `path` label of
    /// `keyfence_datapath_attached`).
    #[must_use]
    pub const fn path(self) -> &'static str {
        match self {
            AttachedMode::Native => "xdp native",
            AttachedMode::Generic => "xdp generic",
            AttachedMode::Tc => "tcx",
            AttachedMode::TcNetlink => "tc-netlink",
        }
    }

    /// XDP (native and generic exclude each other on one interface) or TC.
    const fn is_xdp(self) -> bool {
        matches!(self, AttachedMode::Native | AttachedMode::Generic)
    }

    /// The middle of the link's pin name (see [`link_pin_name`]).
    const fn pin_kind(self) -> &'static str {
        match self {
            AttachedMode::Native => "xdp-native",
            AttachedMode::Generic => "xdp-generic",
            AttachedMode::Tc => "tc",
            // Not `tc-…`: `parse_link_pin` would read it as a TCX link.
            AttachedMode::TcNetlink => "tcnl",
        }
    }

    fn pin_name(self, interface: &str) -> String {
        format!("{LINK_PIN_PREFIX}{}-{interface}", self.pin_kind())
    }

    const ALL: [AttachedMode; 4] = [
        AttachedMode::Native,
        AttachedMode::Generic,
        AttachedMode::Tc,
        AttachedMode::TcNetlink,
    ];

    /// The ladder for a configured mode: what to try, in order. `tc` is the
    /// TC kind `datapath.tc_attach` resolves to on this kernel.
    fn ladder(mode: AttachMode, tc: AttachedMode) -> Vec<AttachedMode> {
        match mode {
            // Never silently generic: generic XDP runs after skb allocation, so it
            // buys nothing over TC and hides a driver problem.
            AttachMode::Auto => vec![AttachedMode::Native, tc],
            AttachMode::Native => vec![AttachedMode::Native],
            AttachMode::Generic => vec![AttachedMode::Generic],
            AttachMode::Tc => vec![tc],
            AttachMode::Off => Vec::new(),
        }
    }

    /// The TC kind for `datapath.tc_attach`: TCX links arrived in Linux 6.6
    /// (aya's own `attach` draws the line at the same version).
    #[must_use]
    pub fn tc_kind(tc_attach: TcAttach) -> AttachedMode {
        match tc_attach {
            TcAttach::Tcx => AttachedMode::Tc,
            TcAttach::Netlink => AttachedMode::TcNetlink,
            TcAttach::Auto => {
                use aya::util::KernelVersion;
                // An unreadable version: try TCX, whose failure says why.
                let tcx =
                    KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0));
                if tcx {
                    AttachedMode::Tc
                } else {
                    AttachedMode::TcNetlink
                }
            }
        }
    }
}

/// Every pinned link's file name starts so (`link-<kind>-<interface>`); map
/// pins are named by `map_names`.
const LINK_PIN_PREFIX: &str = "link-";

/// Whether a file under the pin directory is a link's pin.
#[must_use]
pub fn is_link_pin(name: &str) -> bool {
    name.starts_with(LINK_PIN_PREFIX)
}

/// The mode and interface of a link pin name; `Some((None, rest))`: a link
/// whose mode this keyfence does not know. `None`: not a link pin.
#[must_use]
pub fn parse_link_pin(name: &str) -> Option<(Option<AttachedMode>, &str)> {
    let rest = name.strip_prefix(LINK_PIN_PREFIX)?;
    Some(
        AttachedMode::ALL
            .iter()
            .find_map(|m| {
                rest.strip_prefix(m.pin_kind())
                    .and_then(|r| r.strip_prefix('-'))
                    .map(|interface| (Some(*m), interface))
            })
            .unwrap_or((None, rest)),
    )
}

/// One interface the datapath is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    /// Counter slot (1-based).
    pub slot: u32,
    pub mode: AttachedMode,
    /// The link was pinned by a previous agent and its program replaced in place.
    pub adopted: bool,
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    writer: PolicyWriter<KernelPolicyMaps>,
    unparsed: UnparsedWriter<KernelUnparsed>,
    /// `datapath.unparsed`, written by the next [`Datapath::apply`].
    unparsed_mode: Unparsed,
    counters: Counters,
    /// What scrapes and the drop-sample log read, apart from this struct.
    reader: DatapathReader,
    ifaces: IfaceSlots,
    samples: Option<RingBuf<MapData>>,
    /// The programs' aya-log records (taken once, by the daemon's forwarder).
    logs: Option<crate::datapath_log::DatapathLogger>,
    /// `datapath.tc_attach`, read by the next [`Datapath::attach`].
    tc_attach: TcAttach,
    attachments: Vec<Attachment>,
    /// Interface slots assigned directly (`set_interface_slots`), read with the
    /// attachments' slots.
    extra_iface_slots: Vec<u32>,
    _lock: Option<File>,
}

/// `<pin_root>/v<LAYOUT_VERSION>`.
#[must_use]
pub fn pin_dir(pin_root: &Path) -> PathBuf {
    pin_root.join(format!("v{LAYOUT_VERSION}"))
}

/// The lock file guarding one pin root (bpffs cannot hold regular files).
#[must_use]
pub fn lock_path(pin_root: &Path) -> PathBuf {
    let name: String = pin_root
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Path::new("/run/keyfence").join(format!("{name}.lock"))
}

/// Lock `pin_root`. The lock file is 0600 in the 0700 directory
/// `/run/keyfence`, both the agent's own: a lock anyone could open is a lock
/// anyone could hold (a shared `flock` on a 0644 file kept the agent from
/// starting). See `fsguard::open_lock`.
fn take_lock(pin_root: &Path) -> anyhow::Result<File> {
    let path = lock_path(pin_root);
    let file = crate::fsguard::open_lock(&path, crate::fsguard::euid())?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another keyfence agent holds {} (pin path {}): stop it first (if none runs, \
             `fuser -v {}` names the process holding it)",
            path.display(),
            pin_root.display(),
            path.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Expected kernel layout of every pinned map: type, key size, value size,
/// capacity (the allow-entry maps' sizes come from `datapath.capacity`).
fn expected_layout(name: &str, capacity: MapCapacity) -> Option<(MapType, u32, u32, u32)> {
    use std::mem::size_of;
    let sz = |n: usize| u32::try_from(n).expect("small type");
    Some(match name {
        map_names::LISTENERS => (
            MapType::Hash,
            sz(size_of::<ListenerKey>()),
            sz(size_of::<ListenerValue>()),
            LISTENERS_CAPACITY,
        ),
        map_names::EXACT => (
            MapType::Hash,
            sz(size_of::<PolicyAddr>()),
            4,
            capacity.exact,
        ),
        map_names::PREFIXES => (
            MapType::LpmTrie,
            4 + sz(size_of::<PolicyAddr>()),
            4,
            capacity.prefixes,
        ),
        map_names::STATS => (
            MapType::PerCpuArray,
            4,
            sz(size_of::<StatBlock>()),
            STATS_CAPACITY,
        ),
        map_names::IFINDEX_SLOTS => (MapType::Array, 4, 4, IFINDEX_SLOTS_CAPACITY),
        map_names::PORTS => (MapType::Array, 4, 4, PORTS_CAPACITY),
        map_names::UNPARSED => (
            MapType::Hash,
            sz(size_of::<UnparsedKey>()),
            4,
            UNPARSED_CAPACITY,
        ),
        map_names::DROP_SAMPLES => (MapType::RingBuf, 0, 0, DROP_SAMPLES_BYTES),
        map_names::SAMPLE_CLOCK => (MapType::PerCpuArray, 4, 8, 1),
        map_names::SAMPLE_SKIP => (MapType::PerCpuArray, 4, 4, 1),
        map_names::V4_MODE => (MapType::Array, 4, 4, 1),
        map_names::V4_TOP => (MapType::Array, 4, 4, V4_TOP_CAPACITY),
        map_names::V4_NODES => (MapType::Array, 4, 1024, V4_NODES_CAPACITY),
        map_names::V4_SETS => (MapType::Array, 4, 8, V4_SETS_CAPACITY),
        _ => return None,
    })
}

/// aya reuses a pinned map without comparing layouts; do it here so a map of an
/// older layout is never written with the new one.
fn check_pinned_layouts(dir: &Path, capacity: MapCapacity) -> anyhow::Result<()> {
    for name in map_names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).with_context(|| format!("inspecting {}", path.display()))?;
        let (ty, key, value, max) =
            expected_layout(name, capacity).expect("every map has a layout");
        let found = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let resized = (found.0, found.1, found.2) == (Some(ty), key, value) && found.3 != max;
        if resized && (name == map_names::EXACT || name == map_names::PREFIXES) {
            bail!(
                "pinned map {} holds {} entries, datapath.capacity asks for {max}: a map \
                 cannot be resized in place. Restore the old datapath.capacity, or run \
                 `keyfence detach` (the datapath stops enforcing until the next start) and \
                 start again",
                path.display(),
                found.3
            );
        }
        if found != (Some(ty), key, value, max) {
            bail!(
                "pinned map {} has layout {found:?}, this keyfence expects {:?}; \
                 run `keyfence detach` with the old version's config, or remove {}",
                path.display(),
                (ty, key, value, max),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Pins only outlive the agent on a bpf filesystem. `ip netns exec` remounts
/// `/sys` for the namespace, hiding the host's bpffs; refuse with the fix.
fn check_on_bpffs(pin_root: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);
    let existing = pin_root
        .ancestors()
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("pin path {} has no existing ancestor", pin_root.display()))?;
    let fs_type = nix::sys::statfs::statfs(existing)
        .with_context(|| format!("statfs {}", existing.display()))?
        .filesystem_type();
    if fs_type != BPF_FS_MAGIC {
        bail!(
            "pin path {} is not on a bpf filesystem ({} is not bpffs). Mount it with \
             `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does). Under `ip netns exec`, \
             /sys is remounted and the host's bpffs is hidden: enter only the network \
             namespace instead, e.g. `nsenter --net=/run/netns/NAME keyfence run ...`",
            pin_root.display(),
            existing.display()
        );
    }
    Ok(())
}

fn ifindex(interface: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(interface)
        .with_context(|| format!("interface {interface} not found"))
}

impl Datapath {
    /// Load with maps pinned under `pin_root`, holding the agent lock; new
    /// allow-entry maps are created with `capacity` entries.
    pub fn open(pin_root: &Path, capacity: MapCapacity) -> anyhow::Result<Self> {
        let lock = take_lock(pin_root)?;
        Self::load(pin_root, Some(lock), capacity, true)
    }

    /// Load without the lock and without attaching anywhere: for tests that drive
    /// the programs through `BPF_PROG_TEST_RUN` with a private pin root.
    pub fn load_unattached(pin_root: &Path) -> anyhow::Result<Self> {
        Self::load(pin_root, None, MapCapacity::default(), true)
    }

    /// [`Self::load_unattached`] with the programs' aya-log records switched
    /// off (`AYA_LOG_LEVEL` 0): the bench's "logging off" side.
    pub fn load_unattached_without_log(pin_root: &Path) -> anyhow::Result<Self> {
        Self::load(pin_root, None, MapCapacity::default(), false)
    }

    fn load(
        pin_root: &Path,
        lock: Option<File>,
        capacity: MapCapacity,
        log_records: bool,
    ) -> anyhow::Result<Self> {
        check_on_bpffs(pin_root)?;
        let dir = pin_dir(pin_root);
        // bpffs' root is 1777: a pin directory someone else made (or could
        // write) would let them unlink our links or plant maps; create it
        // 0700 or refuse it with the fix.
        crate::fsguard::ensure_pin_dirs(pin_root, &dir, crate::fsguard::euid())?;
        check_pinned_layouts(&dir, capacity)?;
        // Sizes apply to maps created now; pinned ones were checked above.
        // aya-log-ebpf reads its level from this global: 0 logs nothing.
        let log_level: u8 = if log_records { u8::MAX } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .default_map_pin_directory(&dir)
            .map_max_entries(map_names::EXACT, capacity.exact)
            .map_max_entries(map_names::PREFIXES, capacity.prefixes)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        // Without its log ring the datapath still enforces: say so, go on.
        let logs = crate::datapath_log::take(&mut ebpf)
            .inspect_err(|e| tracing::warn!(error = %e, "the datapath's log records are not read"))
            .ok();
        for name in [program_names::XDP, program_names::TC] {
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
            match program {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            }
            .with_context(|| format!("loading program {name} (verifier)"))?;
        }
        let mut maps = MapSource::Loaded(&mut ebpf);
        let writer =
            PolicyWriter::adopt(KernelPolicyMaps::open(&mut maps)?)?.with_capacity(capacity);
        let unparsed = UnparsedWriter::open(&mut maps)?;
        let counters = Counters::open(&mut maps)?;
        // A handle of its own on the pinned counters: a scrape reads them
        // while an apply holds this struct.
        let reader = DatapathReader {
            counters: Arc::new(Counters::open(&mut MapSource::Pinned(&dir))?),
            labels: Arc::default(),
        };
        let ifaces = IfaceSlots::open(&mut maps)?;
        let samples = Some(maps.map::<RingBuf<MapData>>(map_names::DROP_SAMPLES)?);
        Ok(Self {
            ebpf,
            pin_dir: dir,
            writer,
            unparsed,
            unparsed_mode: Unparsed::Pass,
            counters,
            reader,
            ifaces,
            samples,
            logs,
            tc_attach: TcAttach::Auto,
            attachments: Vec::new(),
            extra_iface_slots: Vec::new(),
            _lock: lock,
        })
    }

    #[must_use]
    pub fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(program_names::XDP)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("checked at load")
    }

    #[must_use]
    pub fn tc(&self) -> &SchedClassifier {
        self.ebpf
            .program(program_names::TC)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .expect("checked at load")
    }

    fn xdp_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(program_names::XDP)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("checked at load")
    }

    fn tc_mut(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(program_names::TC)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("checked at load")
    }

    /// Set `datapath.tc_attach`; the next [`Self::attach`] uses it.
    pub fn set_tc_attach(&mut self, tc_attach: TcAttach) {
        self.tc_attach = tc_attach;
    }

    /// Set `datapath.unparsed`; the next [`Self::apply`] writes it (a reload
    /// always applies the policy it compiles).
    pub fn set_unparsed(&mut self, mode: Unparsed) {
        self.unparsed_mode = mode;
    }

    /// The addresses in `KF_UNPARSED` (16 bytes, IPv4 mapped), read from the kernel.
    pub fn unparsed_addresses(&self) -> anyhow::Result<std::collections::BTreeSet<[u8; 16]>> {
        use crate::maps::unparsed::UnparsedBackend as _;
        Ok(self
            .unparsed
            .backend()
            .read_all()?
            .into_iter()
            .map(|k| k.addr)
            .collect())
    }

    /// Make the maps enforce `policy` (see `maps::policy` for the ordering):
    /// `KF_UNPARSED` loses addresses before the policy maps change and gains
    /// them after (`maps::unparsed`).
    pub fn apply(&mut self, policy: &CompiledPolicy) -> anyhow::Result<ApplyReport> {
        let want = unparsed::wanted(&unparsed::protected(policy), self.unparsed_mode);
        let unguarded = self.unparsed.widen_to(&want)?;
        let before: Vec<u32> = self.writer.slots().by_name.values().copied().collect();
        let mut report = self.writer.apply(policy)?;
        report.removed += unguarded;
        report.added += self.unparsed.narrow_to(&want)?;
        // Slots no listener uses any more start from zero when they are reused.
        let now: Vec<u32> = self.writer.slots().by_name.values().copied().collect();
        for slot in before.into_iter().filter(|s| !now.contains(s)) {
            self.counters
                .clear_listener(slot, keyfence_common::stats::MAX_IFACE_SLOTS)?;
        }
        self.publish_labels();
        Ok(report)
    }

    /// Write only these listeners' prefix changes (see
    /// `PolicyWriter::apply_changes`); `Ok(None)`: use [`Self::apply`].
    pub fn apply_changes(
        &mut self,
        changes: &[(String, crate::prefixset::Change)],
    ) -> anyhow::Result<Option<ApplyReport>> {
        let report = self.writer.apply_changes(changes)?;
        self.publish_labels();
        Ok(report)
    }

    /// Whether [`Self::apply`] of `policy` would fit, writing nothing.
    pub fn check_apply(&self, policy: &CompiledPolicy) -> anyhow::Result<()> {
        self.writer.check_apply(policy)
    }

    /// Whether [`Self::apply_changes`] would fit, writing nothing; `Ok(None)`:
    /// ask [`Self::check_apply`].
    pub fn check_changes(
        &self,
        changes: &[(String, crate::prefixset::Change)],
    ) -> Result<Option<()>, crate::maps::policy::CapacityError> {
        self.writer.check_changes(changes)
    }

    /// Read the policy maps again before a reconcile (see `PolicyWriter::resync`).
    pub fn resync(&mut self) -> anyhow::Result<()> {
        self.writer.resync()
    }

    /// After a failed write: open the listeners whose entries do not cover
    /// `policy` (see `PolicyWriter::open_uncovered`). Returns their names.
    pub fn open_uncovered(&mut self, policy: &CompiledPolicy) -> anyhow::Result<Vec<String>> {
        self.writer.open_uncovered(policy)
    }

    #[must_use]
    pub fn listener_slot(&self, name: &str) -> Option<u32> {
        self.writer.slots().by_name.get(name).copied()
    }

    /// Listener name → slot, as last applied.
    #[must_use]
    pub fn slot_names(&self) -> Vec<(String, u32)> {
        self.writer
            .slots()
            .by_name
            .iter()
            .map(|(n, s)| (n.clone(), *s))
            .collect()
    }

    /// The policy maps' current contents, read from the kernel.
    pub fn tables(&self) -> anyhow::Result<PolicyTables> {
        let backend = self.writer.backend();
        Ok(PolicyTables {
            direct: backend.read_direct()?,
            ..backend.read_all()?
        })
    }

    /// Which structure decides IPv4 sources (`maps::direct`).
    #[must_use]
    pub fn v4_path(&self) -> crate::maps::direct::V4Path {
        self.writer.v4_path()
    }

    /// Counters of every interface slot (slot 0 = interfaces keyfence does not know).
    pub fn counters(&self) -> anyhow::Result<CounterSnapshot> {
        self.counters.snapshot(&self.labels().iface_slots)
    }

    /// The names of interfaces and listener slots as they are now.
    fn labels(&self) -> Labels {
        let mut iface_slots: Vec<u32> = std::iter::once(0)
            .chain(self.attachments.iter().map(|a| a.slot))
            .chain(self.extra_iface_slots.iter().copied())
            .collect();
        iface_slots.sort_unstable();
        iface_slots.dedup();
        Labels {
            attachments: self.attachments.clone(),
            listeners: self.slot_names(),
            iface_slots,
        }
    }

    /// Hand the current names to the reader (after an attach or an apply).
    fn publish_labels(&self) {
        *self
            .reader
            .labels
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(self.labels());
    }

    /// A reader of the counters and their names that never waits for this
    /// datapath (an apply may hold it for seconds).
    #[must_use]
    pub fn reader(&self) -> DatapathReader {
        self.reader.clone()
    }

    #[must_use]
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The programs' log records (taken once, by the agent's forwarder).
    pub fn take_logs(&mut self) -> Option<crate::datapath_log::DatapathLogger> {
        self.logs.take()
    }

    /// The drop-sample ring buffer (taken once, by the agent's sample reader).
    pub fn take_samples(&mut self) -> Option<RingBuf<MapData>> {
        self.samples.take()
    }

    /// Assign counter slots to ifindexes directly (tests use ifindex 1, `lo`).
    pub fn set_interface_slots(&mut self, slots: &[(u32, u32)]) -> anyhow::Result<()> {
        self.ifaces.assign(slots)?;
        self.extra_iface_slots = slots.iter().map(|(_, slot)| *slot).collect();
        self.publish_labels();
        Ok(())
    }

    /// Attach to every interface per the ladder of `mode`, adopting pinned links.
    /// Links pinned for interfaces no longer configured are detached.
    pub fn attach(&mut self, interfaces: &[String], mode: AttachMode) -> anyhow::Result<()> {
        let mut attachments = Vec::new();
        for (i, interface) in interfaces.iter().enumerate() {
            let slot = u32::try_from(i + 1).context("too many interfaces")?;
            let attachment = self
                .attach_one(interface, slot, mode)
                .with_context(|| format!("attaching to {interface}"))?;
            tracing::info!(
                interface,
                mode = attachment.mode.label(),
                path = attachment.mode.path(),
                adopted = attachment.adopted,
                "datapath attached"
            );
            attachments.push(attachment);
        }
        let slots: Vec<(u32, u32)> = attachments.iter().map(|a| (a.ifindex, a.slot)).collect();
        self.ifaces.assign(&slots)?;
        // Links of interfaces that left the config (or mode off): detach them.
        for entry in fs::read_dir(&self.pin_dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(LINK_PIN_PREFIX) else {
                continue;
            };
            let keep = attachments
                .iter()
                .any(|a| a.mode.pin_name(&a.interface) == name);
            if !keep {
                tracing::info!(link = rest, "detaching a link no longer configured");
                remove_attachment(&self.pin_dir, &name)?;
            }
        }
        self.attachments = attachments;
        self.publish_labels();
        Ok(())
    }

    fn attach_one(
        &mut self,
        interface: &str,
        slot: u32,
        mode: AttachMode,
    ) -> anyhow::Result<Attachment> {
        let ifindex = ifindex(interface)?;
        let ladder = AttachedMode::ladder(mode, AttachedMode::tc_kind(self.tc_attach));
        let attachment = |kind, adopted| Attachment {
            interface: interface.into(),
            ifindex,
            slot,
            mode: kind,
            adopted,
        };
        // 1. Adopt a link a previous agent pinned, replacing its program atomically.
        //    Links of a mode the config no longer wants are removed once the new
        //    attachment is in place (XDP and TC coexist), except that native and
        //    generic XDP exclude each other and must swap with a brief gap.
        let mut superseded = Vec::new();
        for kind in AttachedMode::ALL {
            let path = self.pin_dir.join(kind.pin_name(interface));
            if !path.exists() {
                continue;
            }
            if !ladder.contains(&kind) {
                let xdp_swap = kind.is_xdp() && ladder.iter().any(|k| k.is_xdp());
                if xdp_swap {
                    tracing::warn!(
                        interface,
                        from = kind.label(),
                        "XDP mode changed: detaching the old program first (brief gap)"
                    );
                    remove_attachment(&self.pin_dir, &kind.pin_name(interface))?;
                } else {
                    superseded.push(kind.pin_name(interface));
                }
                continue;
            }
            match self.replace_program(kind, interface, &path) {
                Ok(()) => {
                    for old in superseded {
                        remove_attachment(&self.pin_dir, &old)?;
                    }
                    return Ok(attachment(kind, true));
                }
                Err(e) => {
                    tracing::warn!(interface, error = %format!("{e:#}"), "cannot adopt the pinned link; attaching anew");
                    remove_attachment(&self.pin_dir, &kind.pin_name(interface))?;
                }
            }
        }
        // 2. Fresh attach down the ladder.
        let mut errors = Vec::new();
        for &kind in &ladder {
            match self.attach_fresh(kind, interface) {
                Ok(()) => {
                    for old in superseded {
                        tracing::info!(interface, link = %old, "removing the attachment of the previous mode");
                        remove_attachment(&self.pin_dir, &old)?;
                    }
                    return Ok(attachment(kind, false));
                }
                Err(e) => {
                    tracing::warn!(interface, mode = kind.label(), error = %format!("{e:#}"), "attach failed");
                    errors.push(format!("{}: {e:#}", kind.label()));
                }
            }
        }
        bail!("no attach mode worked ({})", errors.join("; "))
    }

    fn replace_program(
        &mut self,
        kind: AttachedMode,
        interface: &str,
        path: &Path,
    ) -> anyhow::Result<()> {
        if kind == AttachedMode::TcNetlink {
            return self.replace_netlink_filter(interface, path);
        }
        let link: FdLink = PinnedLink::from_pin(path)
            .with_context(|| format!("opening {}", path.display()))?
            .into();
        match kind {
            AttachedMode::Native | AttachedMode::Generic => {
                let link = XdpLink::try_from(link).context("pinned link is not XDP")?;
                self.xdp_mut()
                    .attach_to_link(link)
                    .context("replacing the XDP program")?;
            }
            AttachedMode::Tc => {
                let link = SchedClassifierLink::try_from(link).context("pinned link is not TC")?;
                self.tc_mut()
                    .attach_to_link(link)
                    .context("replacing the TC program")?;
            }
            AttachedMode::TcNetlink => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Swap this agent's program into keyfence's filter on `interface`, in
    /// place: `cls_bpf` replaces the program of an existing filter (same
    /// priority and handle) atomically. Then the record pin names the new program.
    fn replace_netlink_filter(&mut self, interface: &str, path: &Path) -> anyhow::Result<()> {
        let link = our_netlink_filter(interface)?;
        let tc = self.tc_mut();
        let id = tc
            .attach_to_link(link)
            .context("replacing the program of keyfence's TC filter")?;
        keep_filter(tc.take_link(id)?);
        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        self.tc_mut()
            .pin(path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(())
    }

    /// A fresh netlink filter at keyfence's priority and handle, on the
    /// clsact qdisc of `interface` (created, and recorded as ours, when absent).
    fn attach_netlink_filter(&mut self, interface: &str, pin: &Path) -> anyhow::Result<()> {
        let qdisc_pin = self
            .pin_dir
            .join(format!("{}{interface}", tc_netlink::QDISC_PIN_PREFIX));
        match aya::programs::tc::qdisc_add_clsact(interface) {
            Ok(()) => {
                tracing::info!(interface, "created the clsact qdisc");
                self.tc_mut()
                    .pin(&qdisc_pin)
                    .with_context(|| format!("pinning {}", qdisc_pin.display()))?;
            }
            Err(aya::programs::tc::TcError::NetlinkError(e))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                // Another program's, or ours from before (its record says so).
                if !qdisc_pin.exists() {
                    tracing::info!(interface, "using the clsact qdisc already there");
                }
            }
            Err(e) => return Err(e).context("adding the clsact qdisc"),
        }
        let options = TcAttachOptions::Netlink(NlOptions {
            priority: tc_netlink::PRIORITY,
            handle: TcHandle::new(0, tc_netlink::HANDLE),
            classid: None,
        });
        let tc = self.tc_mut();
        let id = match tc.attach_with_options(interface, TcAttachType::Ingress, options) {
            Ok(id) => id,
            // A filter at keyfence's place whose record is gone (pins removed
            // by hand): it is keyfence's; replace its program.
            Err(aya::programs::ProgramError::TcError(
                aya::programs::tc::TcError::NetlinkError(e),
            )) if e.raw_os_error() == Some(libc::EEXIST) => {
                tracing::warn!(
                    interface,
                    "a filter is at keyfence's priority and handle without a record: replacing its program"
                );
                let link = our_netlink_filter(interface)?;
                tc.attach_to_link(link)
                    .context("replacing the program of the filter at keyfence's place")?
            }
            Err(e) => return Err(e).context("adding the TC filter through netlink"),
        };
        keep_filter(tc.take_link(id)?);
        tc.pin(pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(())
    }

    fn attach_fresh(&mut self, kind: AttachedMode, interface: &str) -> anyhow::Result<()> {
        let pin = self.pin_dir.join(kind.pin_name(interface));
        let link: FdLink = match kind {
            AttachedMode::TcNetlink => return self.attach_netlink_filter(interface, &pin),
            AttachedMode::Native | AttachedMode::Generic => {
                let mode = if kind == AttachedMode::Native {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let xdp = self.xdp_mut();
                let id = xdp.attach(interface, mode)?;
                let link = xdp.take_link(id)?;
                FdLink::try_from(link).context("XDP attached without a bpf_link: cannot pin")?
            }
            AttachedMode::Tc => {
                let tc = self.tc_mut();
                let id = tc.attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )?;
                let link = tc.take_link(id)?;
                FdLink::try_from(link).context("a TCX attach gave no bpf_link: cannot pin")?
            }
        };
        link.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(())
    }
}

/// keyfence's netlink filter on `interface`'s ingress (its fixed priority and
/// handle), to replace the program inside it.
fn our_netlink_filter(interface: &str) -> anyhow::Result<SchedClassifierLink> {
    Ok(SchedClassifierLink::attached(
        interface,
        TcAttachType::Ingress,
        tc_netlink::PRIORITY,
        TcHandle::new(0, tc_netlink::HANDLE),
        None,
    )?)
}

/// A netlink filter must outlive the agent: aya deletes it when its link
/// value drops, so the value (an interface index, a priority and a handle; no
/// descriptor) is forgotten instead.
fn keep_filter(link: SchedClassifierLink) {
    std::mem::forget(link);
}

/// Remove the attachment a link pin `name` under `dir` records: a TCX or XDP
/// link is unpinned (which detaches it), keyfence's netlink filter deleted and
/// the clsact qdisc removed when this agent created it and nothing else uses
/// it.
fn remove_attachment(dir: &Path, name: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    let Some((Some(AttachedMode::TcNetlink), interface)) = parse_link_pin(name) else {
        return unpin_link(&path);
    };
    // The interface gone: its qdisc and filters went with it.
    if let Ok(index) = nix::net::if_::if_nametoindex(interface) {
        tc_netlink::delete_filter(index)
            .with_context(|| format!("deleting keyfence's TC filter on {interface}"))?;
        let qdisc_pin = dir.join(format!("{}{interface}", tc_netlink::QDISC_PIN_PREFIX));
        if qdisc_pin.exists() {
            match tc_netlink::remove_qdisc_if_unused(index)
                .with_context(|| format!("removing the clsact qdisc of {interface}"))?
            {
                tc_netlink::QdiscOutcome::KeptInUse(n) => tracing::info!(
                    interface,
                    filters = n,
                    "leaving the clsact qdisc keyfence created: other filters are on it"
                ),
                tc_netlink::QdiscOutcome::Removed | tc_netlink::QdiscOutcome::Absent => {}
            }
            fs::remove_file(&qdisc_pin)
                .with_context(|| format!("removing {}", qdisc_pin.display()))?;
        }
    }
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// Unpin a link; dropping the last reference detaches it.
fn unpin_link(path: &Path) -> anyhow::Result<()> {
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            let _detached: FdLink = link
                .unpin()
                .with_context(|| format!("unpinning {}", path.display()))?;
            Ok(())
        }
        Err(e) => {
            // Not a link we can open (stale file): remove it all the same.
            tracing::warn!(path = %path.display(), error = %e, "removing an unreadable link pin");
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
    }
}

/// A link pinned under a pin directory (`keyfence status` lists them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    pub interface: String,
    /// `None`: a link pin whose mode this keyfence does not know.
    pub mode: Option<AttachedMode>,
    /// The program the link runs, when the link can be opened.
    pub program_id: Option<u32>,
}

/// The links pinned in `dir` (a layout directory, see [`pin_dir`]).
pub fn pinned_links(dir: &Path) -> anyhow::Result<Vec<PinnedLinkInfo>> {
    let mut links = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some((mode, interface)) = parse_link_pin(&name) else {
            continue;
        };
        let program_id = if mode == Some(AttachedMode::TcNetlink) {
            // The record of a netlink filter is a pin of its program.
            ProgramInfo::from_pin(dir.join(&name)).ok().map(|i| i.id())
        } else {
            PinnedLink::from_pin(dir.join(&name))
                .ok()
                .and_then(|l| FdLink::from(l).info().ok())
                .map(|i| i.program_id())
        };
        links.push(PinnedLinkInfo {
            interface: interface.to_owned(),
            mode,
            program_id,
        });
    }
    Ok(links)
}

/// What `keyfence detach` removed.
#[derive(Debug, Default)]
pub struct DetachReport {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Detach every pinned link and remove every pin under `pin_root` (uninstall).
/// Refuses while an agent holds the lock.
pub fn detach(pin_root: &Path) -> anyhow::Result<DetachReport> {
    let _lock = take_lock(pin_root)?;
    let mut report = DetachReport::default();
    let dir = pin_dir(pin_root);
    if !dir.exists() {
        // Nothing pinned; the lock file `take_lock` just made goes too.
        let _ = fs::remove_file(lock_path(pin_root));
        return Ok(report);
    }
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_link_pin(&name) {
            remove_attachment(&dir, &name)?;
            report.links.push(name);
        }
    }
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
        report
            .maps
            .push(entry.file_name().to_string_lossy().into_owned());
    }
    fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    // The root too, when nothing else (another layout version) lives there.
    if fs::read_dir(pin_root).is_ok_and(|mut d| d.next().is_none()) {
        fs::remove_dir(pin_root).with_context(|| format!("removing {}", pin_root.display()))?;
    }
    // Uninstalled: the lock file goes too (we still hold it, so no agent is
    // between opening and locking it).
    let _ = fs::remove_file(lock_path(pin_root));
    Ok(report)
}

/// The names that label the datapath's counters and drop samples: the
/// interfaces it is attached to and the listener slots of the last apply.
#[derive(Clone, Debug, Default)]
pub struct Labels {
    pub attachments: Vec<Attachment>,
    /// Listener name → slot.
    pub listeners: Vec<(String, u32)>,
    /// The interface counter slots to read (0 = interfaces keyfence does not
    /// know; the attached ones; those assigned directly).
    iface_slots: Vec<u32>,
}

impl Labels {
    /// The interface and listener a sample names, empty when unknown.
    fn name_sample(&self, sample: &DropSample) -> (String, String) {
        let interface = self
            .attachments
            .iter()
            .find(|a| a.ifindex == sample.ifindex)
            .map(|a| a.interface.clone())
            .unwrap_or_default();
        let listener = self
            .listeners
            .iter()
            .find(|(_, slot)| *slot == sample.policy)
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        (interface, listener)
    }
}

/// Reads the datapath's counters and names through handles of its own: it
/// shares only the kernel map with [`Datapath`], so a metrics scrape or a
/// drop sample never waits behind a policy apply.
#[derive(Clone)]
pub struct DatapathReader {
    counters: Arc<Counters>,
    labels: Arc<RwLock<Arc<Labels>>>,
}

impl std::fmt::Debug for DatapathReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathReader").finish_non_exhaustive()
    }
}

impl DatapathReader {
    /// The names as of the last attach or apply.
    #[must_use]
    pub fn labels(&self) -> Arc<Labels> {
        self.labels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The counters of the interface slots `labels` names, summed over CPUs.
    pub fn counters(&self, labels: &Labels) -> anyhow::Result<CounterSnapshot> {
        self.counters.snapshot(&labels.iface_slots)
    }
}

/// Log the kernel's drop samples (already rate-limited per CPU in the
/// kernel), naming interface and listener through `reader`; `count` is
/// called for each one. Runs until the ring cannot be polled.
pub async fn log_samples(
    ring: RingBuf<MapData>,
    reader: DatapathReader,
    count: impl Fn(),
) -> anyhow::Result<()> {
    let mut fd = crate::sys::async_ring(ring).context("polling the drop-sample ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut samples = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if let Some(s) = decode_sample(&item) {
                samples.push(s);
            }
        }
        guard.clear_ready();
        if samples.is_empty() {
            continue;
        }
        let labels = reader.labels();
        for s in samples {
            count();
            let (interface, listener) = labels.name_sample(&s);
            let src = crate::allowlist::fold_ip(std::net::Ipv6Addr::from(s.src).into());
            let dst = crate::allowlist::fold_ip(std::net::Ipv6Addr::from(s.dst).into());
            tracing::info!(
                %src,
                %dst,
                port = u16::from_be_bytes(s.port),
                interface,
                listener,
                "datapath dropped a packet (sample)"
            );
        }
    }
}

/// Decode one ring-buffer record.
#[must_use]
pub fn decode_sample(bytes: &[u8]) -> Option<DropSample> {
    if bytes.len() < std::mem::size_of::<DropSample>() {
        return None;
    }
    let b = |r: std::ops::Range<usize>| -> Vec<u8> { bytes[r].to_vec() };
    Some(DropSample {
        src: b(0..16).try_into().ok()?,
        dst: b(16..32).try_into().ok()?,
        port: [bytes[32], bytes[33]],
        proto: bytes[34],
        _pad: 0,
        ifindex: u32::from_ne_bytes(b(36..40).try_into().ok()?),
        policy: u32::from_ne_bytes(b(40..44).try_into().ok()?),
        _pad2: [0; 4],
    })
}
