//! The real datapath loaded for `BPF_PROG_TEST_RUN` (no interface attached),
//! with a private pin root removed however the test ends.

use std::path::{Path, PathBuf};

use keyfence::{
    datapath::Datapath,
    policy::{Access, ListenerPolicy},
};

/// `BPF_PROG_TEST_RUN` runs programs on the loopback device (ifindex 1).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// A loaded datapath and the guard of its pins (dropped after it).
pub struct Loaded {
    pub datapath: Datapath,
    pins: Pins,
}

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = keyfence::datapath::detach(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Loaded {
    /// The pin root (`datapath::pin_dir` of it holds the pinned maps).
    #[must_use]
    pub fn pin_root(&self) -> &Path {
        &self.pins.0
    }

    /// Load under `/sys/fs/bpf/kf-<name>-<pid>`, counting loopback packets
    /// under interface slot `lo_slot`.
    pub fn new(name: &str, lo_slot: u32) -> anyhow::Result<Self> {
        Self::with(name, lo_slot, Datapath::load_unattached)
    }

    /// [`Loaded::new`] with the programs' aya-log records off (the bench).
    pub fn without_log(name: &str, lo_slot: u32) -> anyhow::Result<Self> {
        Self::with(name, lo_slot, Datapath::load_unattached_without_log)
    }

    fn with(
        name: &str,
        lo_slot: u32,
        load: fn(&std::path::Path) -> anyhow::Result<Datapath>,
    ) -> anyhow::Result<Self> {
        let root = PathBuf::from(format!("/sys/fs/bpf/kf-{name}-{}", std::process::id()));
        let pins = Pins(root.clone());
        let mut datapath = load(&root)?;
        datapath.set_interface_slots(&[(LOOPBACK_IFINDEX, lo_slot)])?;
        Ok(Self { datapath, pins })
    }
}

/// A restricted listener policy from literals.
#[must_use]
pub fn restricted(name: &str, bind: &str, nets: &[&str]) -> ListenerPolicy {
    ListenerPolicy {
        name: name.into(),
        bind: bind.parse().expect("bind literal"),
        access: Access::Restricted(
            nets.iter()
                .map(|n| n.parse().expect("CIDR literal"))
                .collect(),
        ),
    }
}

/// An open listener policy.
#[must_use]
pub fn open(name: &str, bind: &str) -> ListenerPolicy {
    ListenerPolicy {
        name: name.into(),
        bind: bind.parse().expect("bind literal"),
        access: Access::Open,
    }
}
