//! `cargo xtask bench`: performance measured side by side in one run (never by
//! timed tests). So far the datapath section: the real XDP program's cost per
//! packet through `BPF_PROG_TEST_RUN` at growing prefix counts. The table is
//! printed and written to `target/bench/report.md`.

use anyhow::Context as _;

use crate::{cmd, setup};

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    let mut bench = cmd::cargo();
    bench.args([
        "run",
        "--release",
        "--package",
        "keyfence-tests",
        "--bin",
        "kf-bench",
    ]);
    let output = bench.output().context("running kf-bench")?;
    let table = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        anyhow::bail!(
            "kf-bench failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let dir = cmd::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let report = format!(
        "# keyfence bench\n\n## Datapath cost (BPF_PROG_TEST_RUN, repeat 1,000,000, median of 5)\n\n{table}"
    );
    std::fs::write(dir.join("report.md"), &report)?;
    print!("{report}");
    println!("\nbench: wrote {}", dir.join("report.md").display());
    Ok(())
}
