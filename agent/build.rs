//! Builds the eBPF object (crate `keyfence-ebpf`) with the nightly toolchain and
//! the bpfel target through aya-build; `src/datapath.rs` embeds the result.
//! `cargo xtask setup` installs what this needs (rust-src, bpf-linker).

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "keyfence-ebpf")
        .ok_or_else(|| anyhow!("package keyfence-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("keyfence-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` (nightly rust-src, bpf-linker)",
    )
}
