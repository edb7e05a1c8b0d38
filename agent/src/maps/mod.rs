//! Typed wrappers over the datapath's maps, one module per map family (mirroring
//! `common`). They offer domain verbs; nothing outside this module touches a raw
//! map handle. Each wrapper opens its own maps by name from a [`MapSource`]:
//! the loaded object (the agent) or the pins (`keyfence status`).

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Map, MapData, MapError},
};

pub mod direct;
pub mod ifaces;
#[cfg(any(test, feature = "test-support"))]
pub mod memory;
pub mod packed;
pub mod policy;
pub mod stats;
pub mod unparsed;

/// Where the wrappers find their maps.
pub enum MapSource<'a> {
    /// The object just loaded; each map can be taken once.
    Loaded(&'a mut Ebpf),
    /// The pins of a layout directory (`datapath::pin_dir`), opened without
    /// loading anything: what enforces while no agent runs.
    Pinned(&'a Path),
}

impl MapSource<'_> {
    /// The map `name` (one of `map_names`) as the typed map `T`.
    pub fn map<T>(&mut self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = match self {
            MapSource::Loaded(ebpf) => ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))?,
            MapSource::Pinned(dir) => {
                let path = dir.join(name);
                let data = MapData::from_pin(&path).with_context(|| {
                    format!(
                        "opening {} (is the datapath loaded? start `keyfence run` once)",
                        path.display()
                    )
                })?;
                Map::from_map_data(data)
                    .with_context(|| format!("pinned map {} of an unknown type", path.display()))?
            }
        };
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }
}
