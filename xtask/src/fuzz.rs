//! The fuzz stage of `cargo xtask test`: build the `fuzz/` crate (cargo-fuzz,
//! nightly, not a workspace member) and run every target for a bounded time.
//!
//! Budget: CI has 2 cores and 90 minutes for everything, so each target runs
//! [`SECONDS_PER_TARGET`]: four targets, 160 s of fuzzing (measured: 1.1 M
//! executions of `proxy_header`, 2.1 M of `forwarded_for`, 0.2 M of `config`,
//! 0.66 M of `allowlist`), plus the build (the agent and its dependencies with
//! coverage instrumentation, in `fuzz/target`: 9.5 min from cold on 2 cores
//! shared with five other builds, a no-op when nothing changed).
//! `KEYFENCE_FUZZ_SECONDS` overrides the time for a longer local run. The sanitizer is off (`--sanitizer none`): the
//! code under fuzz is safe Rust (`unsafe` lives only in `sys.rs`, which no
//! target reaches), so the address sanitizer would find nothing there and would
//! double the build and slow each run; panics and failed assertions are what
//! the targets look for. Each target keeps its corpus in `fuzz/corpus/<target>`
//! (ignored by git), so local runs build on earlier ones; a crash is written to
//! `fuzz/artifacts/<target>/` and fails the stage.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, bail};

use crate::cmd;

/// The targets (`fuzz/Cargo.toml`'s `[[bin]]`s) and the libFuzzer options of each.
pub const TARGETS: &[(&str, &[&str])] = &[
    ("allowlist", &["-max_len=4096"]),
    // A PROXY header is at most 552 bytes; a little more shows what follows it.
    ("proxy_header", &["-max_len=640"]),
    ("forwarded_for", &["-max_len=2048"]),
    ("config", &["-max_len=8192", "-dict=config.dict"]),
];

/// Seconds each target runs in `cargo xtask test`.
pub const SECONDS_PER_TARGET: u64 = 40;

/// cargo-fuzz's release that `cargo xtask setup` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One target's run.
pub struct Outcome {
    pub target: &'static str,
    pub ok: bool,
    pub note: String,
}

fn fuzz_dir() -> PathBuf {
    cmd::workspace_root().join("fuzz")
}

/// `cargo +nightly fuzz …` in `fuzz/`: the rustup proxy picks the nightly
/// (the `$CARGO` xtask runs under is the stable toolchain's own binary).
fn cargo_fuzz() -> std::process::Command {
    let mut cmd = cmd::new("cargo", ["+nightly", "fuzz"]);
    cmd.current_dir(fuzz_dir());
    cmd
}

fn seconds() -> anyhow::Result<u64> {
    match std::env::var("KEYFENCE_FUZZ_SECONDS") {
        Ok(s) => s
            .parse()
            .with_context(|| format!("KEYFENCE_FUZZ_SECONDS={s:?} is not a number of seconds")),
        Err(_) => Ok(SECONDS_PER_TARGET),
    }
}

/// Build every target once.
pub fn build() -> anyhow::Result<()> {
    let mut build = cargo_fuzz();
    build.args(["build", "--sanitizer", "none"]);
    println!("test: fuzz: {}", cmd::display(&build));
    cmd::run(&mut build)
}

/// Run every target for its time; one outcome per target.
pub fn run_all() -> anyhow::Result<Vec<Outcome>> {
    let seconds = seconds()?;
    if seconds == 0 {
        bail!("KEYFENCE_FUZZ_SECONDS=0 runs nothing");
    }
    let mut outcomes = Vec::new();
    for (target, options) in TARGETS {
        let corpus = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut run = cargo_fuzz();
        run.args(["run", "--sanitizer", "none", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input that takes a second is a bug of its own (a reload
            // that hangs the agent); libFuzzer reports it as a timeout.
            .arg("-timeout=5")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .args(*options);
        println!("test: fuzz: {}", cmd::display(&run));
        let started = Instant::now();
        let result = cmd::run(&mut run);
        let took = started.elapsed().as_secs();
        outcomes.push(match result {
            Ok(()) => Outcome {
                target,
                ok: true,
                note: format!("{took} s, no crash"),
            },
            Err(e) => Outcome {
                target,
                ok: false,
                note: format!(
                    "{e:#}; the input is in fuzz/artifacts/{target}/ (replay it with \
                     `cargo +nightly fuzz run --sanitizer none {target} <file>` in fuzz/)"
                ),
            },
        });
    }
    Ok(outcomes)
}

/// Whether `cargo fuzz` runs and reports [`CARGO_FUZZ_VERSION`].
pub fn installed_version() -> Option<String> {
    let out = cmd::output(&mut cmd::new("cargo", ["+nightly", "fuzz", "--version"])).ok()?;
    out.split_whitespace().nth(1).map(str::to_owned)
}
