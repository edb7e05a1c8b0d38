//! Builds the eBPF object (crate `keyfence-ebpf`) with the nightly toolchain and
//! the bpfel target through aya-build; `src/datapath.rs` embeds the result.
//! With the `bench` feature it also builds the bench object
//! (`keyfence-bench-ebpf`, `datapath::BENCH_OBJECT`).
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
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_BENCH").is_some() {
        &["bench"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` (nightly rust-src, bpf-linker)",
    )
}
