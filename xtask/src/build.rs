//! `cargo xtask build`: setup, then a release build of the workspace's default
//! members. The agent's build script compiles the eBPF object through aya-build
//! (nightly, `bpfel-unknown-none`, bpf-linker), which works once setup ran.

use std::path::PathBuf;

use crate::{cmd, setup};

/// Setup, build in release mode, and return the path of the `keyfence` binary.
pub fn run() -> anyhow::Result<PathBuf> {
    setup::run()?;
    agent(Profile::Release)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

/// Build the `keyfence` binary (without setup) and return its path.
pub fn agent(profile: Profile) -> anyhow::Result<PathBuf> {
    let mut build = cmd::cargo();
    build.arg("build");
    let dir = match profile {
        Profile::Release => {
            build.arg("--release");
            "release"
        }
        Profile::Debug => {
            build.args(["--package", "keyfence"]);
            "debug"
        }
    };
    cmd::run(&mut build)?;
    let bin = cmd::target_dir().join(dir).join("keyfence");
    anyhow::ensure!(bin.is_file(), "the build did not produce {}", bin.display());
    println!("build: {}", bin.display());
    Ok(bin)
}
