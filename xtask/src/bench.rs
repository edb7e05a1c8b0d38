//! `cargo xtask bench`: performance measured side by side in one run (never by
//! timed tests). Two sections so far:
//!
//! - datapath: the real XDP program's cost per packet through
//!   `BPF_PROG_TEST_RUN` at growing prefix counts (`kf-bench`);
//! - shim: requests/s and latency with wrk, upstream directly against keyfence
//!   in proxy mode and nginx with `allow`/`deny` (`kf-bench-shim`);
//! - change: an allow-list change through the management API until enforced,
//!   with 100,000 prefixes loaded, and the agent's start time and RSS with
//!   them (`kf-bench-change`).
//!
//! The tables are printed and written to `target/bench/report.md`.

use std::path::Path;

use anyhow::Context as _;

use crate::{build, cmd, setup};

/// Run one bench binary of the tests package (release) and return its stdout.
fn section(bin: &str, keyfence: &Path) -> anyhow::Result<String> {
    let mut bench = cmd::cargo();
    bench.env("KEYFENCE_BIN", keyfence).args([
        "run",
        "--release",
        "--package",
        "keyfence-tests",
        "--bin",
        bin,
    ]);
    println!("bench: {}", cmd::display(&bench));
    let output = bench.output().with_context(|| format!("running {bin}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{bin} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    let keyfence = build::agent(build::Profile::Release)?;
    let datapath = section("kf-bench", &keyfence)?;
    let shim = section("kf-bench-shim", &keyfence)?;
    let change = section("kf-bench-change", &keyfence)?;
    let dir = cmd::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let report = format!(
        "# keyfence bench\n\n## Datapath cost (BPF_PROG_TEST_RUN, repeat 1,000,000, median of 5)\n\n{datapath}\n## Shim overhead (wrk on loopback)\n\n{shim}\n## Change and scale (100,000 prefixes loaded)\n\n{change}"
    );
    std::fs::write(dir.join("report.md"), &report)?;
    print!("{report}");
    println!("\nbench: wrote {}", dir.join("report.md").display());
    Ok(())
}
